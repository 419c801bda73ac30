"""Studies: protocols that ``metalab compare`` cannot run by itself, because their baselines
are not meta-learners or their numbers are means over several data splits. Each study module
trains the meta-learners through :class:`~metalab.train.Trainer` from built-in configs,
computes the baselines on the same tasks in the same run, prints a table and writes result
records (``docs/records/``). Run one with ``python -m metalab.studies.<name> --help``.

* :mod:`~metalab.studies.movielens`: cold-start recommendation, users as tasks (MeLU).
* :mod:`~metalab.studies.ett`: forecasting for a new transformer (ETTh1 <-> ETTh2).
* :mod:`~metalab.studies.intents`: few-shot intents on BANKING77 and CLINC150, run by
  ``metalab compare --suite banking77-5w1s`` (and the other text suites).
"""
