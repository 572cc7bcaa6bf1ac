"""Mixed precision: LocalMIM's HOG targets and loss stay float32 under bf16/fp16 autocast, and TrainStep's fp16
GradScaler branch (util/train_step.py) skips an overflowing step (counted, scale halved) and unscales before
clipping and stepping."""
import math

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401
from models.hog import HOGLayer
from models.localmim import MaskedAutoencoderViT
from util.train_step import TrainStep

pytestmark = pytest.mark.usefixtures('one_thread')

AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}


@pytest.mark.parametrize('hog_bias', [False, True])
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_localmim_hog_targets_and_loss_are_float32_under_autocast(monkeypatch, amp, hog_bias):
    torch.manual_seed(0)
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32, hog_bias=hog_bias)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), 'cpu', amp=amp)
    histograms, losses = [], []
    real_histogram, real_loss = HOGLayer.histogram, MaskedAutoencoderViT.forward_loss

    def recording_histogram(self, x):
        out = real_histogram(self, x)
        histograms.append((x.dtype, torch.is_autocast_enabled('cpu'), out.dtype))
        return out

    def recording_loss(pred, target, mask):
        out = real_loss(pred, target, mask)
        losses.append((pred.dtype, target.clone(), out.dtype))
        return out

    monkeypatch.setattr(HOGLayer, 'histogram', recording_histogram)
    monkeypatch.setattr(MaskedAutoencoderViT, 'forward_loss', staticmethod(recording_loss))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    with trainer.autocast():
        loss, _ = model(imgs, 0.75, noise=noise)
    # one shared histogram without --hog_bias, one per scale with it; all computed in fp32 with autocast off
    assert histograms == [(torch.float32, False, torch.float32)] * (4 if hog_bias else 1)
    assert loss.dtype == torch.float32 and len(losses) == 4
    assert all(pred == AMP[amp] and out == torch.float32 for pred, _, out in losses)  # autocast was really on
    for k, (_, target, _) in enumerate(losses):  # the very targets of a run without autocast
        assert target.dtype == torch.float32
        assert torch.equal(target, model.HOG(imgs, k, model.shared_histogram(imgs)))


def linear_with_exact_fp16_values():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.125, -0.75]]))
        model.bias.copy_(torch.tensor([0.25, -0.5]))
    return model


# the gradient of sum(model(X)) / 4 is exact in fp16, also scaled by 2**15: the rows of X summed, over 4 (weight),
# and the batch size over 4 (bias)
X = torch.tensor([[0.5, -0.25, 0.125], [0.25, 0.5, -0.5]])
GRAD_W = torch.tensor([[0.1875, 0.0625, -0.09375], [0.1875, 0.0625, -0.09375]])
GRAD_B = torch.tensor([0.5, 0.5])
GRAD_NORM = math.sqrt(2 * (0.1875 ** 2 + 0.0625 ** 2 + 0.09375 ** 2) + 2 * 0.5 ** 2)


@pytest.mark.parametrize('clip', [None, 0.25])
def test_fp16_grad_scaler_skips_an_overflow_then_steps_unscaled(clip):
    model = linear_with_exact_fp16_values()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    lr = 0.5
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=lr), 'cpu', amp='fp16', clip_grad=clip)
    assert trainer.scaler.get_scale() == 2.0 ** 16

    # an injected inf: no update, counted as a skipped step, the scale halves
    with trainer.autocast():
        loss = model(X).float().sum() * float('inf')
    trainer.backward(loss)
    trainer.step()
    assert torch.equal(model.weight, w0) and torch.equal(model.bias, b0)
    assert int(trainer.skipped) == 1 and int(trainer.consecutive) == 1
    assert trainer.scaler.get_scale() == 2.0 ** 15

    # a finite step: plain SGD on the unscaled (and, with a clip, clipped) gradient
    with trainer.autocast():
        out = model(X)
        loss = out.float().sum() / 4
    assert out.dtype == torch.float16
    trainer.backward(loss)
    trainer.step()
    factor = 1.0 if clip is None else clip / (GRAD_NORM + 1e-6)  # torch's clip_grad_norm_ formula
    torch.testing.assert_close(model.weight.detach(), w0 - lr * factor * GRAD_W, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * factor * GRAD_B, rtol=1e-6, atol=1e-7)
    assert float(trainer.grad_norm) == pytest.approx(GRAD_NORM, rel=1e-6)  # measured on unscaled gradients
    assert int(trainer.skipped) == 1 and int(trainer.consecutive) == 0
    assert trainer.scaler.get_scale() == 2.0 ** 15  # no growth before 2000 good steps


def test_fp16_gradient_overflow_with_a_finite_loss_is_the_scalers_business():
    model = linear_with_exact_fp16_values()
    w0 = model.weight.detach().clone()
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.5), 'cpu', amp='fp16')
    with trainer.autocast():
        loss = model(X * 8).float().sum() * 4  # finite loss, but 4 * 2**16 * 3 overflows fp16 gradients
    assert torch.isfinite(loss)
    trainer.backward(loss)
    trainer.step()
    assert torch.equal(model.weight, w0) and trainer.scaler.get_scale() == 2.0 ** 15
    assert int(trainer.skipped) == 0  # not a bad step of the run: the scaler handles it
