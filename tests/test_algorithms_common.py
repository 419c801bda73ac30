"""The public common checks (metalab.testing) on every registered algorithm and every task
kind it supports, as scikit-learn checks every estimator; exemptions are declared by the
algorithms themselves (``check_exemptions``), with their reasons, and are not run."""

from __future__ import annotations

import pytest

from metalab.algorithms import ALGORITHMS
from metalab.kinds import CLASSIFICATION, REGRESSION
from metalab.testing import CHECKS, checks, run_check

CASES = list(checks())
RUN = [case for case in CASES if case[3] is None]
SLOW = {"check_learns"}  # the others take well under a second each


def test_registry_lists_the_families() -> None:
    families = {cls.family for cls in ALGORITHMS.values()}
    assert {"metric", "optimization", "model", "baseline"} <= families
    assert {"protonet", "matchingnet", "relationnet", "finetune"} <= set(ALGORITHMS)
    assert {"maml", "fomaml", "anil", "metasgd", "reptile"} <= set(ALGORITHMS)


def test_every_algorithm_is_checked_on_every_kind_it_supports() -> None:
    pairs = {(name, kind) for name, kind, _, _ in CASES}
    for name, cls in ALGORITHMS.items():
        for kind in (CLASSIFICATION, REGRESSION):
            assert ((name, kind.name) in pairs) == cls.supports(kind), (name, kind)
    assert all(sum(1 for c in CASES if c[:2] == pair) == len(CHECKS) for pair in pairs)


def test_every_exemption_gives_a_reason_and_names_a_check() -> None:
    for name, cls in ALGORITHMS.items():
        for check, reason in cls.check_exemptions.items():
            assert check.split(":")[0] in CHECKS, (name, check)
            assert len(reason) > 20, (name, check)


def test_only_the_learning_check_is_ever_exempt() -> None:
    exempt = {(name, kind, check) for name, kind, check, why in CASES if why is not None}
    assert {check for _, _, check in exempt} <= {"check_learns"}
    assert {name for name, _, _ in exempt} == {"snail", "mann", "recurrent", "cnp"}
    assert ("cnp", "regression", "check_learns") not in exempt


@pytest.mark.parametrize(
    ("name", "kind", "check"),
    [pytest.param(*case[:3], marks=[pytest.mark.slow] if case[2] in SLOW else [])
     for case in RUN],
    ids=[f"{name}-{kind}-{check}" for name, kind, check, _ in RUN])
def test_common_check(name: str, kind: str, check: str) -> None:
    run_check(name, kind, check)
