"""Meta-reinforcement learning: tasks are environments with their parameters (a goal).

* :mod:`~metalab.rl.navigation`: 2D navigation, vectorised over tasks and trajectories;
* :mod:`~metalab.rl.policy`: a Gaussian MLP policy as a function of (per-task) parameters;
* :mod:`~metalab.rl.episodes`: rollouts, returns, the linear feature baseline, GAE;
* :mod:`~metalab.rl.trpo`: conjugate gradient, the KL-bounded step, the line search;
* :mod:`~metalab.rl.maml_trpo`: MAML with VPG inner steps and a TRPO outer step;
* :mod:`~metalab.rl.study`: training with checkpoints and resume, the fixed-goal evaluation,
  the baselines (pretrained on all tasks; random initialisation).
"""
