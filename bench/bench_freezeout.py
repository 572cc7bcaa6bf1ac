"""FreezeOut cost model: step time and FLOPs at every frozen depth, and the whole-run saving of a schedule.

For each frozen depth k (k leading units frozen: unit 0 = patch embedding + cls token, unit i = block
i-1; the last block never freezes) the model is frozen exactly as training does it (`FreezeOut.freeze`
on a fused AdamW over `FreezeOut.param_groups`), then one optimizer step (forward + backward + AdamW
via `TrainStep`, synthetic batch on the device) is timed; the median over --steps is reported. The
FLOPs of one forward + backward are counted at each depth; the FLOP cost model predicts
time_k = time_0 * flops_k / flops_0. The schedule (--how_scale, --t_0, --epochs, --warmup_epochs)
gives the fraction of the run spent at each depth, hence the predicted saving of the whole run.

    # CPU
    python bench/bench_freezeout.py --model MIM_vit_tiny_patch16 --input_size 64 --batch_size 16
    # GPU (add --json results.jsonl to keep the result)
    python bench/bench_freezeout.py --batch_size 128 --amp bf16

Comparing FreezeOut with the equal-cost baseline: FreezeOut's run of E epochs costs as much as a
baseline (no FreezeOut) run of the printed "equal-cost epochs" E * (1 - saving). Pretrain that
baseline with --epochs set to it and the same warmup *fraction* (--warmup_epochs scaled by the same
factor), fine-tune both checkpoints with the same recipe, and compare fine-tuned accuracy (and the
measured total wall-clock of the two pretraining runs, which should match).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402,F401  (registers MIM_vit_*)
from bench.bench_pretrain import count_step_flops  # noqa: E402
from util.freezeout import SCALE_FNS, FreezeOut, FreezeOutSchedule  # noqa: E402
from util.train_step import TrainStep  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='MIM_vit_base_patch16')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default=None, help='default: bf16 on CUDA, none on CPU')
    p.add_argument('--compile', action='store_true', help='model.compile() in place (recompiles at each depth)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps per depth (default 5; CPU: 2)')
    p.add_argument('--steps', type=int, default=None, help='timed steps per depth (default 20; CPU: 5)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--how_scale', choices=sorted(SCALE_FNS), default='cubic')
    p.add_argument('--t_0', type=float, default=0.8)
    p.add_argument('--epochs', type=float, default=100)
    p.add_argument('--warmup_epochs', type=float, default=10)
    p.add_argument('--steps_per_epoch', type=int, default=1000, help='only for the step counts printed')
    p.add_argument('--json', default=None, help='append the result to this file as one JSON line')
    args = p.parse_args()
    cuda = torch.device(args.device).type == 'cuda'
    args.amp = args.amp or ('bf16' if cuda else 'none')
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    return args


def depth_fractions(schedule):
    """Fraction of the run (of its optimizer steps) at each frozen depth, exact: depth is piecewise constant."""
    edges = sorted({0.0, float(schedule.epochs), *(a for a in schedule.freeze_at if a < schedule.epochs)})
    frac = [0.0] * len(schedule.t)
    for lo, hi in zip(edges, edges[1:]):
        frac[schedule.frozen_units((lo + hi) / 2)] += (hi - lo) / schedule.epochs
    return frac


def analytic_saving(schedule, beta=2.0):
    """Spec 2.3, encoder blocks only, equal cost: S = beta * sum(1 - tau_i) / ((1 + beta) * n_blocks)."""
    w = schedule.warmup_epochs / schedule.epochs
    taus = [w + (1 - w) * t for t in schedule.t[1:]]  # units 1.. are the blocks
    return beta * sum(1 - tau for tau in taus) / ((1 + beta) * len(taus))


def time_steps(step, n, device):
    """Seconds of each of n steps: CUDA events (one sync after the last), perf_counter on the host."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for e in events[1:]:
            step()
            e.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = timm.create_model(args.model, img_size=args.input_size).to(device).train()
    num_units = len(model.blocks) + 1
    schedule = FreezeOutSchedule(num_units, args.how_scale, args.t_0, args.epochs, args.warmup_epochs, 1e-4, 0.0)
    freezeout = FreezeOut(model, schedule)
    groups = freezeout.param_groups(0.05)
    try:  # fused where the device has a fused AdamW kernel, as in training
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    trainer = TrainStep(model, optimizer, device, amp=args.amp)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if args.compile:
        model.compile()

    def step():
        with trainer.autocast():
            loss, _ = model(imgs, mask_ratio=args.mask_ratio)
        trainer.backward(loss)
        trainer.step()

    rows = []
    for k in range(num_units):  # k = 0 .. num_units - 1: the last unit (block) never freezes
        if k:
            with contextlib.redirect_stdout(None):  # FreezeOut's own log line, once per depth
                freezeout.freeze(optimizer, k)
        # model.forward: eager even after model.compile(), so FlopCounterMode sees every op
        flops = count_step_flops(model.forward, trainer, imgs, args.mask_ratio)
        for _ in range(args.warmup):
            step()
        step_s = statistics.median(time_steps(step, args.steps, device))
        rows.append({'frozen': k, 'active_units': num_units - k, 'active_stages': len(model.active_stages()),
                     'gflop_per_image': flops / args.batch_size / 1e9, 'flops': flops, 's_per_step': step_s})
        print(f'depth {k:2d}: {step_s:.4f} s/step, {flops / args.batch_size / 1e9:.3f} GFLOP/img', flush=True)

    t0, f0 = rows[0]['s_per_step'], rows[0]['flops']
    # Affine refinement: a constant per-step overhead c (optimizer, launches, masking, HOG...) fitted on
    # the shallowest and deepest depth, time = c + (t0 - c) * flops / flops_0.
    tl, fl = rows[-1]['s_per_step'], rows[-1]['flops']
    c = (tl * f0 - t0 * fl) / (f0 - fl)
    frac = depth_fractions(schedule)
    total_steps = args.epochs * args.steps_per_epoch
    print(f'\n{args.model} | {args.input_size}px | batch {args.batch_size} | {args.amp} | {device} '
          f"{'compiled' if args.compile else 'eager'} | median of {args.steps} steps per depth")
    print(' k  units stages  GFLOP/img  meas s/step  FLOP s/step  err %  affine s/step  err %   run %     steps')
    for r, fr in zip(rows, frac):
        r['flop_model_s'] = t0 * r['flops'] / f0
        r['affine_model_s'] = c + (t0 - c) * r['flops'] / f0
        r['run_fraction'] = fr
        err = lambda m: 100 * (r['s_per_step'] - m) / m  # noqa: E731
        print(f"{r['frozen']:2d} {r['active_units']:6d} {r['active_stages']:6d} {r['gflop_per_image']:10.3f} "
              f"{r['s_per_step']:12.4f} {r['flop_model_s']:12.4f} {err(r['flop_model_s']):6.1f} "
              f"{r['affine_model_s']:14.4f} {err(r['affine_model_s']):6.1f} {100 * fr:7.2f} {fr * total_steps:9.0f}")

    saving = {'measured': 1 - sum(fr * r['s_per_step'] for fr, r in zip(frac, rows)) / t0,
              'flop_model': 1 - sum(fr * r['flops'] for fr, r in zip(frac, rows)) / f0,
              'analytic_encoder_beta2': analytic_saving(schedule)}
    equal_epochs = args.epochs * (1 - saving['measured'])
    print(f'\naffine overhead term c = {c:.4f} s/step ({100 * c / t0:.1f}% of the depth-0 step)')
    print(f'schedule: {args.how_scale}, t_0 {args.t_0}, {args.epochs:g} epochs, {args.warmup_epochs:g} warmup; '
          f'first freeze at epoch {schedule.freeze_at[0]:.2f}')
    print(f"(a) predicted saving, measured per-depth times: {saving['measured']:.1%}")
    print(f"(b) predicted saving, FLOP model:                {saving['flop_model']:.1%}")
    print(f"(c) analytic encoder-only estimate (beta = 2):   {saving['analytic_encoder_beta2']:.1%} "
          f'(spec 2.3: about 14.5% for 12 blocks, cubic 0.8, 10/100 warmup)')
    print(f'(d) equal-cost baseline: {equal_epochs:.1f} epochs '
          f'(warmup {args.warmup_epochs * equal_epochs / args.epochs:.1f} to keep the warmup fraction)')
    if args.json:
        res = {'model': args.model, 'device': torch.cuda.get_device_name(device) if device.type == 'cuda'
               else f'cpu ({torch.get_num_threads()} threads)', 'batch_size': args.batch_size,
               'input_size': args.input_size, 'amp': args.amp, 'compile': args.compile, 'fused_adamw': trainer.fused,
               'warmup': args.warmup, 'steps': args.steps, 'how_scale': args.how_scale, 't_0': args.t_0,
               'epochs': args.epochs, 'warmup_epochs': args.warmup_epochs, 'affine_overhead_s': c,
               'depths': rows, 'saving': saving, 'equal_cost_epochs': equal_epochs, 'torch': torch.__version__}
        with open(args.json, 'a') as f:
            f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
    main()
