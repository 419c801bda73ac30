"""metalab: meta-learning for PyTorch.

Every algorithm is an ``nn.Module`` with two methods::

    loss, metrics = algo.meta_loss(batch)        # batch: TaskBatch of T tasks
    predictor = algo.adapt(support_x, support_y)  # adaptation to one new task
    predictor(query_x)                            # logits or predictions
"""

__version__ = "0.1.0"
