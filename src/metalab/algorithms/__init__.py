"""Meta-learning algorithms, one file each, registered by name in :data:`ALGORITHMS`."""

from metalab.algorithms import (  # noqa: F401  (importing a module registers its algorithm)
    anil,
    cnp,
    finetune,
    fomaml,
    maml,
    mann,
    matchingnet,
    metasgd,
    pretrained,
    protonet,
    recurrent,
    relationnet,
    reptile,
    snail,
)
from metalab.algorithms.base import (
    ALGORITHMS,
    MetaLearner,
    Predictor,
    TaskSpec,
    build_algorithm,
    register,
    task_spec,
)

__all__ = ["ALGORITHMS", "MetaLearner", "Predictor", "TaskSpec", "build_algorithm", "register",
           "task_spec"]
