"""An adapted predictor as plain tensors, and back: what a service stores so that a restart
serves a task at once, without adapting again.

    state = predictor_state(algo.adapt(support_x, support_y), algo)
    torch.save(state, buffer)                              # tensors, numbers, strings only
    predictor = restore_predictor(torch.load(buffer, weights_only=True), algo)

A predictor is whatever :meth:`MetaLearner.adapt` returns: an object holding the task's state
(prototypes, adapted weights, encoded memory) and references to the algorithm. Its attributes
are written as they are when they are tensors, numbers, strings or containers of them; a
reference to the algorithm or one of its modules as that module's path in the algorithm; a
dataclass (a learner's memory) field by field; a module that is a copy of one of the
algorithm's modules (a fine-tuned backbone) as its path and its weights. Restoring looks up
classes by name only inside :mod:`metalab`, so a state can name no code outside it, and
``torch.load(..., weights_only=True)`` reads it without unpickling anything.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import io
from typing import Any

import torch
from torch import Tensor, nn

from metalab.algorithms import MetaLearner, Predictor

__all__ = ["UnsupportedPredictor", "predictor_state", "restore_predictor", "state_bytes",
           "state_from_bytes"]

_PACKAGE = "metalab."


class UnsupportedPredictor(TypeError):
    """The predictor holds something that is not tensors, numbers or the algorithm's modules."""


def predictor_state(predictor: Predictor, algorithm: MetaLearner) -> dict[str, Any]:
    """``predictor`` as nested dicts and lists of tensors, numbers and strings."""
    return {"class": _class_name(type(predictor)),
            "attributes": _encode(vars(predictor), _module_paths(algorithm), algorithm)}


def restore_predictor(state: dict[str, Any], algorithm: MetaLearner) -> Predictor:
    """The predictor ``state`` describes, bound to ``algorithm`` (the same weights it was
    adapted with: a state does not record them)."""
    cls = _named_class(state["class"])
    predictor = cls.__new__(cls)
    vars(predictor).update(_decode(state["attributes"], algorithm))
    return predictor


def _class_name(cls: type) -> str:
    if not cls.__module__.startswith(_PACKAGE):
        raise UnsupportedPredictor(f"{cls.__qualname__} is not a metalab class; only metalab's "
                                   "own predictors and memories can be stored.")
    return f"{cls.__module__}:{cls.__qualname__}"


def _named_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(_PACKAGE) or not qualname or "." in qualname:
        raise ValueError(f"a stored predictor names {name!r}, not a metalab class.")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not isinstance(cls, type):
        raise ValueError(f"a stored predictor names {name!r}, which this version of metalab "
                         "does not have; adapt the task again.")
    return cls


def _module_paths(algorithm: nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in algorithm.named_modules()}


def _encode(value: Any, paths: dict[int, str], algorithm: nn.Module) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, nn.Module):
        if id(value) in paths:
            return {"module": paths[id(value)]}
        return {"module_copy": _copied_path(value, algorithm),
                "weights": {k: v.detach() for k, v in value.state_dict().items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": _class_name(type(value)),
                "fields": {f.name: _encode(getattr(value, f.name), paths, algorithm)
                           for f in dataclasses.fields(value)}}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, paths, algorithm) for k, v in value.items()}}
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return {type(value).__name__: [_encode(v, paths, algorithm) for v in value]}
    raise UnsupportedPredictor(f"cannot store a {type(value).__qualname__} held by a predictor.")


def _copied_path(module: nn.Module, algorithm: nn.Module) -> str:
    """The path of the algorithm's module that ``module`` is a copy of (same type, same
    parameter and buffer names and shapes)."""
    def shapes(m: nn.Module) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in m.state_dict().items()}

    for path, own in algorithm.named_modules():
        if type(own) is type(module) and shapes(own) == shapes(module):
            return path
    raise UnsupportedPredictor(f"a predictor holds a {type(module).__qualname__} that is not one "
                               "of the algorithm's modules nor a copy of one.")


def _decode(value: Any, algorithm: nn.Module) -> Any:
    if not isinstance(value, dict):
        return value
    if "module" in value:
        return algorithm.get_submodule(value["module"])
    if "module_copy" in value:
        module = copy.deepcopy(algorithm.get_submodule(value["module_copy"]))
        module.load_state_dict(value["weights"])
        return module.requires_grad_(False)
    if "dataclass" in value:
        cls = _named_class(value["dataclass"])
        return cls(**{k: _decode(v, algorithm) for k, v in value["fields"].items()})
    if "dict" in value:
        return {k: _decode(v, algorithm) for k, v in value["dict"].items()}
    if "tuple" in value:
        return tuple(_decode(v, algorithm) for v in value["tuple"])
    return [_decode(v, algorithm) for v in value["list"]]


def state_bytes(state: dict[str, Any]) -> bytes:
    """``state`` serialised by ``torch.save`` (read it back with :func:`state_from_bytes`)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """A state written by :func:`state_bytes`, read with ``weights_only=True``."""
    return torch.load(io.BytesIO(data), weights_only=True)
