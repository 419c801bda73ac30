"""Backbones: Conv4's channels-last option computes the same network as the default layout."""

from __future__ import annotations

import pytest
import torch

from metalab.algorithms import TaskSpec, build_algorithm
from metalab.models import Conv4, SupportStatistics, build_backbone
from metalab.tasks import TaskBatch


@pytest.mark.parametrize("options", [{}, {"stride": 2, "pool_blocks": 0},
                                     {"pool_blocks": 2, "flatten": False}])
def test_channels_last_conv4_is_the_same_function_and_gradient(options: dict) -> None:
    torch.manual_seed(0)
    nchw = Conv4(hidden=16, **options).double()
    nhwc = Conv4(hidden=16, channels_last=True, **options).double()
    nhwc.load_state_dict(nchw.state_dict())  # checkpoints move between the layouts
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    outputs = [net(x) for net in (nchw, nhwc)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    for out in outputs:
        out.square().sum().backward()
    for a, b in zip(nchw.parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
    assert nhwc[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc[0](x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def test_channels_last_maml_meta_gradient_matches_in_float64() -> None:
    spec = TaskSpec(kind="classification", n_way=3, input_shape=(1, 16, 16))
    generator = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.rand(2, 3, 1, 16, 16, generator=generator, dtype=torch.float64),
                      torch.arange(3).repeat(2, 1),
                      torch.rand(2, 6, 1, 16, 16, generator=generator, dtype=torch.float64),
                      torch.arange(3).repeat(2, 2), torch.arange(3).repeat(2, 1))
    grads = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        backbone = build_backbone("conv4", spec.input_shape, hidden=8,
                                  channels_last=channels_last)
        algo = build_algorithm("maml", backbone, spec, inner_lr=0.4, inner_steps=2).double()
        algo.meta_loss(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in algo.parameters()]))
    assert (grads[1] - grads[0]).norm() <= 1e-10 * grads[0].norm()


def test_backbones_slice_into_plain_sequentials() -> None:
    conv = Conv4(hidden=8)
    x = torch.rand(2, 1, 28, 28)
    assert conv[:2](x).shape == (2, 8, 7, 7)  # the first two blocks
    mlp = build_backbone("mlp", (3,), hidden=(5, 4))
    assert mlp[:3](torch.rand(2, 3)).shape == (2, 5)
    assert isinstance(conv[0], torch.nn.Sequential) and len(conv[-1:]) == 1


def test_support_statistics_without_a_query_is_training_mode_batch_norm() -> None:
    """MetaBN on a batch of support examples only is exactly BatchNorm in training mode."""
    torch.manual_seed(0)
    net = Conv4(hidden=8).double().train()
    x = torch.randn(6, 1, 28, 28, dtype=torch.double)
    with SupportStatistics() as support:
        out = net(x)
    assert torch.allclose(out, net(x), rtol=0, atol=1e-12)
    assert len(support.recorded) == 4  # one (mean, variance) per BatchNorm layer


def test_support_statistics_normalise_queries_with_the_support_set_only() -> None:
    """Queries embedded with the support set in one call equal queries embedded later with
    the recorded statistics, and a query's features do not depend on the other queries."""
    torch.manual_seed(0)
    net = Conv4(hidden=8).double().train()
    support_x, query_x = torch.randn(5, 1, 28, 28).double(), torch.randn(7, 1, 28, 28).double()
    with SupportStatistics(support=5):
        together = net(torch.cat([support_x, query_x]))[5:]
    with SupportStatistics() as support:
        net(support_x)
    with SupportStatistics(recorded=support.recorded):
        later = net(query_x)
    with SupportStatistics(recorded=support.recorded):
        alone = net(query_x[:1])
    assert torch.allclose(together, later, rtol=0, atol=1e-12)
    assert torch.allclose(alone, later[:1], rtol=0, atol=1e-12)
    with SupportStatistics(recorded=support.recorded[:2]), pytest.raises(RuntimeError,
                                                                         match="recorded"):
        net(query_x)
