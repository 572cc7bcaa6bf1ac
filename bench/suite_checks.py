"""Numerical checks of the GPU suite that need no entry script.

    python bench/suite_checks.py fp16_inf --device cuda --result out.json
    python bench/suite_checks.py slak_routes --device cuda --result out.json [--quick]

fp16_inf     TrainStep at --amp fp16 (GradScaler, fused AdamW as in training): a step whose loss is inf must
             leave the weights and the optimizer state untouched, be counted in `trainer.skipped` and halve the
             loss scale; the next, finite step must update the weights and keep the scale.
slak_routes  one SLaK large-kernel unit (Decom 51x5 + 5x51 + 5x5 branches, SLaK-T stage-1 size) in float32:
             the dense, crop and fft routes agree in training (outputs and input gradients) and in evaluation,
             and so does the reparameterised (merged) kernel. TF32 is switched off for this check, since it
             rounds convolution inputs to 10 mantissa bits. Agreement: max |route - dense| <= ROUTE_TOLERANCE x
             max |dense| (float32 sums of ~2600 products per output; the FFT adds O(log n) rounding steps).
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.train_step import TrainStep  # noqa: E402

ROUTE_TOLERANCE = 1e-4


def fp16_inf(device, quick):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    trainer = TrainStep(model, optimizer, device, amp='fp16')
    x = torch.randn(8, 16, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    scale_before = trainer.scaler.get_scale()

    with trainer.autocast():
        loss = model(x).float().pow(2).mean() * float('inf')
    trainer.backward(loss)
    trainer.step()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    res = {'weights_unchanged': unchanged, 'optimizer_state_empty': all(
        not s or float(s['step']) == 0 for s in optimizer.state.values()),
        'skipped': int(trainer.skipped), 'scale_before': scale_before, 'scale_after': trainer.scaler.get_scale()}

    with trainer.autocast():
        loss = model(x).float().pow(2).mean()
    trainer.backward(loss)
    trainer.step()
    res['finite_step_updates'] = not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    res['scale_after_finite_step'] = trainer.scaler.get_scale()
    res['skipped_after_finite_step'] = int(trainer.skipped)
    ok = (unchanged and res['optimizer_state_empty'] and res['skipped'] == 1
          and res['scale_after'] == scale_before / 2 and res['finite_step_updates']
          and res['scale_after_finite_step'] == res['scale_after'] and res['skipped_after_finite_step'] == 1)
    return ok, res


def slak_routes(device, quick):
    from models.slak import ReparamLargeKernelConv
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    # SLaK-T (width 1.3) stage 1: 124 channels at 56x56; quick: 20 px, still below 51, so the crop route crops
    channels, size = (8, 20) if quick else (124, 56)
    unit = ReparamLargeKernelConv(channels, channels, 51, small_kernel=5, Decom=True).to(device)
    with torch.no_grad():  # BN statistics and affine terms away from their identity defaults
        for m in unit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, channels, size, size, device=device, requires_grad=True)
    weight = torch.linspace(0, 1, size, device=device)
    errors = {}

    def rel(a, ref):
        return float((a - ref).abs().max() / ref.abs().max())

    unit.train()
    ref = None
    for impl in ('dense', 'crop', 'fft'):
        unit.conv_impl = impl
        out = unit(x)
        grad, = torch.autograd.grad((out * weight).sum(), [x])
        if ref is None:
            ref = (out.detach(), grad)
        else:
            errors[f'train_{impl}_out'], errors[f'train_{impl}_grad'] = rel(out.detach(), ref[0]), rel(grad, ref[1])
    unit.eval()
    with torch.no_grad():
        unit.conv_impl = 'dense'
        three = unit(x)
        for impl in ('crop', 'fft'):
            unit.conv_impl = impl
            errors[f'eval_{impl}'] = rel(unit(x), three)
        unit.reparameterize()
        for impl in ('dense', 'crop', 'fft'):
            unit.conv_impl = impl
            errors[f'merged_{impl}'] = rel(unit(x), three)
    worst = max(errors.values())
    return worst <= ROUTE_TOLERANCE, {'channels': channels, 'size': size, 'kernel': 51, 'tolerance': ROUTE_TOLERANCE,
                                      'worst_relative_error': worst, 'relative_errors': errors}


CHECKS = {'fp16_inf': fp16_inf, 'slak_routes': slak_routes}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('check', choices=sorted(CHECKS))
    p.add_argument('--device', default='cuda')
    p.add_argument('--quick', action='store_true')
    p.add_argument('--result', required=True)
    args = p.parse_args()
    ok, res = CHECKS[args.check](torch.device(args.device), args.quick)
    Path(args.result).write_text(json.dumps({'status': 'ok' if ok else 'failed', **res}, indent=1))
    print(json.dumps(res, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
