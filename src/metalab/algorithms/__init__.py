"""Meta-learning algorithms, one file each, registered by name in :data:`ALGORITHMS`."""

from metalab.algorithms import finetune, matchingnet, protonet, relationnet  # noqa: F401  (register)
from metalab.algorithms.base import (
    ALGORITHMS,
    MetaLearner,
    Predictor,
    TaskSpec,
    build_algorithm,
    register,
)

__all__ = ["ALGORITHMS", "MetaLearner", "Predictor", "TaskSpec", "build_algorithm", "register"]
