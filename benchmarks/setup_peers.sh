#!/usr/bin/env bash
# Create .venv-peers: a virtual environment, separate from metalab's own, holding the peer
# libraries that benchmarks compare metalab against (today: easyfsl). None of them is, or
# must become, a dependency of metalab.
#
#   bash benchmarks/setup_peers.sh            # create or update .venv-peers in the repo root
#   .venv-peers/bin/python benchmarks/protonet_throughput.py --quick
#
# Environment: PYTHON (default python3) builds the venv; VENV (default <repo>/.venv-peers).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO/.venv-peers}"
TORCH_VERSION="2.13.0"
EASYFSL_VERSION="1.5.0"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV with $("$PYTHON" --version)"
    # A plain venv (no --system-site-packages): what the benchmark imports is what is listed here.
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# torch pinned exactly: on this workplace's machines pip takes the local CPU wheel
# (torch-2.13.0+cpu, seconds). An unpinned or ranged torch would make pip resolve a
# multi-GB CUDA build from PyPI, so torch is always installed first, pinned, on its own.
"${PIP[@]}" "torch==$TORCH_VERSION"

# easyfsl without its declared dependencies (torchvision, pandas, matplotlib, tqdm): the
# benchmark imports only easyfsl/methods/prototypical_networks.py and the two modules it
# needs (few_shot_classifier.py, utils.py), which import nothing but torch. torchvision would
# also drag in another torch (PyPI's torchvision does not load beside the local CPU torch).
# pip then reports "easyfsl 1.5.0 requires matplotlib/pandas/torchvision, which is not installed":
# expected, and harmless for the benchmark.
"${PIP[@]}" --no-deps "easyfsl==$EASYFSL_VERSION"

# metalab itself, editable, with its runtime dependencies named by hand: --no-deps keeps pip
# from re-resolving torch.
"${PIP[@]}" numpy pillow pyyaml tqdm
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch

import metalab

print(f"torch {torch.__version__}, easyfsl {md.version('easyfsl')}, "
      f"metalab {md.version('metalab')} ({metalab.__file__})")
if not torch.__version__.endswith("+cpu"):
    print("warning: this torch is not the local CPU build; check the pip output above.")
EOF
echo "ready: $VENV/bin/python benchmarks/protonet_throughput.py --quick"
