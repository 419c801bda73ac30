"""The repository's promises: CI runs exactly the README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## The two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("metalab compare")
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_readme_own_tasks_example_trains() -> None:
    """The README's "Your own tasks" example runs as printed and its MAML learns the lines."""
    import contextlib
    import io

    from metalab.evaluate import evaluate
    from metalab.tasks import fixed_episodes

    text = (ROOT / "README.md").read_text()
    code = text.split("### Your own tasks", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.step == 300 and trainer.out is None  # nothing written
    assert float(printed.getvalue()) == trainer.state.best
    episodes = fixed_episodes(namespace["tasks"], 100, seed=1)
    untrained = namespace["build_algorithm"](
        "maml", namespace["MLP"](1, hidden=(32, 32)), namespace["task_spec"](namespace["tasks"]),
        inner_lr=0.05)
    assert evaluate(trainer.algo, episodes).mean < 0.5 * evaluate(untrained, episodes).mean
