"""Peak memory of a block of work, measured in the running process.

On CUDA the peak comes from the caching allocator (``torch.cuda.max_memory_allocated``). On
the CPU it is the peak resident set size (Linux ``VmHWM``), whose high-water mark is reset on
entry by writing ``5`` to ``/proc/self/clear_refs``, after the allocator's free pages are
returned to the kernel (pages it reused would not count). The figure is the peak above the
resident size at entry, so what was loaded before (data, the model) is not counted. Elsewhere
(macOS, Windows, a kernel refusing the reset) the CPU figure is ``None``, not a wrong number.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import TracebackType

import torch

__all__ = ["PeakMemory", "available_bytes", "status_kib"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(key: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB (Linux)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on ``device`` (CPU: the kernel's MemAvailable; CUDA: the
    allocator's free memory), or None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc ``malloc_trim``), so that
    the block's allocations show in the resident size instead of reusing freed pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass


def _reset_cpu_peak() -> bool:
    _release_free_memory()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mib``: the block's peak memory
    above its starting level, in MiB (``None`` where it cannot be measured)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mib: float | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _reset_cpu_peak():
            self._start = status_kib("VmRSS") * 1024
        else:
            self._start = -1
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._start >= 0:
            peak = status_kib("VmHWM") * 1024
        else:
            return
        self.mib = max(peak - self._start, 0) / 2**20
