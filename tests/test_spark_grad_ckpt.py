"""SparK activation checkpointing (--grad_ckpt): the same loss, gradients and BN running statistics as
without it (float64), the sparse mask held during the recomputation, and blocks really recomputed."""
import copy

import pytest
import torch

import main_spark
from models.spark import build_spark


def _pair(name, dp):
    torch.manual_seed(0)
    plain = build_spark(name, input_size=64, mask_ratio=0.5, dp=dp).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    return plain, ckpt


def _step(model, x, mask):
    torch.manual_seed(1)                       # the same drop-path draws in both models
    loss = model(x, active_b1ff=mask)
    loss.backward()
    return loss


@pytest.mark.parametrize('name', ['resnet18', 'convnext_atto'])
def test_same_loss_gradients_and_running_stats(name):
    plain, ckpt = _pair(name, dp=0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = plain.mask(3, 'cpu', generator=g)
    assert mask.any() and not mask.all()
    for _ in range(2):                          # twice: running stats after two updates, not four
        torch.testing.assert_close(_step(ckpt, x, mask), _step(plain, x, mask), rtol=1e-12, atol=0)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-14, msg=n)
    buffers = dict(plain.named_buffers())
    for n, b in ckpt.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=1e-12, atol=0, msg=n)
    counters = [b for n, b in ckpt.named_buffers() if n.endswith('num_batches_tracked')]
    if name.startswith('resnet'):
        assert counters and all(int(c) == 2 for c in counters)


def _count_block_calls(model):
    calls = []
    for block in (model.sparse_encoder.sp_cnn.layer1[0], model.dense_decoder.dec[-1]):
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    return calls


def test_blocks_are_recomputed_only_when_training_with_grad():
    _, model = _pair('resnet18', dp=0.0)
    calls = _count_block_calls(model)
    x, mask = torch.randn(2, 3, 64, 64, dtype=torch.float64), model.mask(2, 'cpu')
    model(x, active_b1ff=mask).backward()
    assert len(calls) == 4                      # encoder block and decoder block, each forward + recompute
    calls.clear()
    with torch.no_grad():
        model(x, active_b1ff=mask)
    model.eval()
    model(x, active_b1ff=mask).backward()
    assert len(calls) == 4                      # twice one call each
    assert model.sparse_encoder.holder.mask is None


def test_flag():
    parser = main_spark.get_args_parser()
    assert parser.parse_args([]).grad_ckpt is False
    assert parser.parse_args(['--grad_ckpt']).grad_ckpt is True
    assert parser.parse_args(['--grad_ckpt=False']).grad_ckpt is False
