"""Meta-reinforcement learning: tasks are environments with their parameters (a goal).

* :mod:`~metalab.rl.navigation`: 2D navigation, vectorised over tasks and trajectories;
* :mod:`~metalab.rl.cheetah`: HalfCheetah direction / velocity tasks (MuJoCo, optional);
* :mod:`~metalab.rl.policy`: a Gaussian MLP policy as a function of (per-task) parameters;
* :mod:`~metalab.rl.episodes`: rollouts, returns, the linear feature baseline, GAE;
* :mod:`~metalab.rl.trpo`: conjugate gradient, the KL-bounded step, the line search;
* :mod:`~metalab.rl.maml_trpo`: MAML with VPG inner steps and a TRPO outer step;
* :mod:`~metalab.rl.rl2`: RL², a recurrent policy trained with PPO across episodes;
* :mod:`~metalab.rl.study`: the training loops (checkpoints, resume, torchrun shares), the
  fixed test goals and the evaluation;
* :mod:`~metalab.rl.run`: configs (``kind: rl``) for ``metalab train``, ``evaluate`` and
  ``compare --suite nav2d``.
"""
