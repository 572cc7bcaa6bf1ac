"""FreezeOut cost model: step time and FLOPs at every frozen depth, and the whole-run saving of a schedule.

For each frozen depth k (k leading units frozen: unit 0 = patch embedding + cls token, unit i = block
i-1; the last block never freezes) the model is frozen as training does it (`FreezeOut.freeze`, fused
AdamW over `FreezeOut.param_groups`) and optimizer steps (`TrainStep`, synthetic batch on the device)
are timed: median over --steps, lowest over --rounds. FLOP cost model: time_k = time_0 * flops_k /
flops_0 (FLOPs of one forward + backward); the affine variant adds a constant per-step term fitted
on the first and last depth. The schedule gives the fraction of the run at each depth, hence the saving,
and the epochs of an equal-cost baseline (how to compare with it: docs/FREEZEOUT.md).

    python bench/bench_freezeout.py --model MIM_vit_tiny_patch16 --input_size 64 --batch_size 16   # CPU
    python bench/bench_freezeout.py --batch_size 128 --amp bf16 --json results.jsonl            # GPU
(on a small or shared CPU, --threads 1 --rounds 3 gives much steadier numbers)

--feature_masking also times, per depth, a step of the exact cache (--freeze_cache) served from the cache,
a step of feature masking served from its store, and the extra work of a store miss (the frozen prefix on
all tokens), and predicts the whole-run saving of plain FreezeOut, the exact cache and feature masking
for cubic t_0 0.8 and linear t_0 0.5 (bench/freezeout_scaling.py: stored samples carried on to deeper depths,
the stores of each process, the samplers). --flops_only counts without timing (ViT-B on a CPU). Under torchrun
the steps are DDP steps (gloo on CPU), the model re-wrapped at each freeze as in training, so the all-reduce of
the trainable parameters is in every measured step:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_freezeout.py --model MIM_vit_tiny_patch16 \
        --input_size 64 --batch_size 16 --feature_masking --threads 1 --rounds 3
"""
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
from torch.utils import flop_counter  # noqa: E402

from bench.bench_pretrain import CPU_SDPA_FLOPS, count_step_flops, finish_args, step_parser, training_step  # noqa
from bench.freezeout_scaling import run_savings  # noqa: E402
from util.dist import get_world_size, is_main_process  # noqa: E402
from util.freezeout.feature_masking import FeatureMasking  # noqa: E402
from util.runtime import attach_ddp  # noqa: E402
from util.freezeout.schedule import SCALE_FNS, FreezeOut, FreezeOutSchedule  # noqa: E402


def get_args():
    p = step_parser(cpu_warmup=2, cpu_steps=5)  # --warmup/--steps are per depth here
    p.add_argument('--rounds', type=int, default=1, help='sweeps over all depths (fresh model each), best kept')
    p.add_argument('--how_scale', choices=sorted(SCALE_FNS), default='cubic')
    p.add_argument('--t_0', type=float, default=0.8)
    p.add_argument('--epochs', type=float, default=100)
    p.add_argument('--warmup_epochs', type=float, default=10)
    p.add_argument('--steps_per_epoch', type=int, default=1000, help='only for the step counts printed')
    p.add_argument('--feature_masking', action='store_true', help='also time the exact cache and feature masking')
    p.add_argument('--feature_target', choices=['hog', 'features', 'both'], default='hog')
    p.add_argument('--flops_only', action='store_true', help='count FLOPs, time nothing (e.g. ViT-B on a CPU)')
    return finish_args(p.parse_args())


def depth_fractions(schedule):
    """Fraction of the run (of its optimizer steps) at each frozen depth, exact: depth is piecewise constant."""
    edges = sorted({0.0, float(schedule.epochs), *(a for a in schedule.freeze_at if a < schedule.epochs)})
    frac = [0.0] * len(schedule.t)
    for lo, hi in zip(edges, edges[1:]):
        frac[schedule.frozen_units((lo + hi) / 2)] += (hi - lo) / schedule.epochs
    return frac


def analytic_saving(schedule, beta=2.0):
    """Analytic saving, encoder blocks only, with a backward pass beta times the forward:
    S = beta * sum(1 - tau_i) / ((1 + beta) * n_blocks)."""
    w = schedule.warmup_epochs / schedule.epochs
    taus = [w + (1 - w) * t for t in schedule.t[1:]]  # units 1.. are the blocks
    return beta * sum(1 - tau for tau in taus) / ((1 + beta) * len(taus))


def time_steps(step, n, device):
    """Seconds of each of n steps (on CUDA, synchronised just before and after each one)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(step, args, device):
    """The median seconds of args.steps steps after args.warmup untimed ones (None with --flops_only)."""
    if args.flops_only:
        return None
    for _ in range(args.warmup):
        step()
    return statistics.median(time_steps(step, args.steps, device))


def sweep(args, device, count_flops):
    """A fresh model frozen deeper and deeper: one row per depth (FLOPs only when count_flops)."""
    model = timm.create_model(args.model, img_size=args.input_size)
    if args.feature_masking:
        model.add_feature_heads(args.feature_target)
    model = model.to(device).train()
    num_units = len(model.blocks) + 1
    schedule = FreezeOutSchedule(num_units, args.how_scale, args.t_0, args.epochs, args.warmup_epochs, 1e-4, 0.0)
    freezeout = FreezeOut(model, schedule)
    groups = freezeout.param_groups(0.05)
    trainer, imgs, step = training_step(model, groups, args, device)
    masking = FeatureMasking(freezeout, args.mask_ratio, 0) if args.feature_masking else None
    attach_ddp(trainer, device, freezeout)  # under torchrun: re-wrapped at each freeze, as run_pretrain.py does
    optimizer = trainer.optimizer
    if args.compile:  # each depth recompiles (requires_grad, no-grad prefix): keep dynamo from giving up
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * num_units)
        model.compile()

    rows = []
    # k = 0 .. num_units - 1 (the last unit never freezes), or only the depths listed in args.depths
    for k in getattr(args, 'depths', None) or range(num_units):
        if k:
            with contextlib.redirect_stdout(None):  # FreezeOut's own log line, once per depth
                freezeout.freeze(optimizer, k)
        # model.forward: eager even after model.compile(), so FlopCounterMode sees every op
        flops = count_step_flops(model.forward, trainer, imgs, args.mask_ratio) if count_flops else None
        rows.append({'frozen': k, 'active_units': num_units - k, 'active_stages': len(model.active_stages()),
                     'trainable_params': sum(p.numel() for p in model.parameters() if p.requires_grad),
                     'flops': flops, 's_per_step': median_seconds(step, args, device)})
        if masking:
            rows[-1].update(time_stored_paths(model, trainer, masking, imgs, args, device, rows[-1], count_flops))
        if not args.flops_only and is_main_process():
            print(f"depth {k:2d}: {rows[-1]['s_per_step']:.4f} s/step", flush=True)
    return rows, schedule, trainer.fused


def time_stored_paths(model, trainer, masking, imgs, args, device, row, count_flops):
    """Seconds per step (and FLOPs, with count_flops) at the current depth: exact cache hit, feature masking hit,
    and a store miss's extra work. At depth 0 nothing is stored and both paths are the exact step."""
    if not model.frozen_units:
        return {'cache_hit_s': row['s_per_step'], 'fm_hit_s': row['s_per_step'], 'fm_store_s': 0.0,
                'cache_hit_flops': row['flops'], 'fm_hit_flops': row['flops'], 'fm_store_flops': 0}
    with trainer.autocast():
        prefix = model.forward_prefix(imgs, args.mask_ratio)
        features = model.frozen_features(imgs).to(torch.get_autocast_dtype(device.type) if args.amp != 'none'
                                                  else torch.float32).float()

    def timed(kwargs):
        def step():
            with trainer.autocast():
                loss, _ = trainer.model(imgs, mask_ratio=args.mask_ratio, **kwargs())
            trainer.backward(loss)
            trainer.step()
        return median_seconds(step, args, device)

    def store():
        with trainer.autocast():
            model.frozen_features(imgs)

    def flops(kwargs):
        if not count_flops:
            return None
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            with trainer.autocast():
                loss, _ = model(imgs, mask_ratio=args.mask_ratio, **kwargs())
            loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()
    fm_kwargs = lambda: {'prefix': model.mask_features(features, args.mask_ratio, masking.noise(imgs)),  # noqa: E731
                         'features': features}
    if count_flops:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            store()
    return {'cache_hit_flops': flops(lambda: {'prefix': prefix}), 'fm_hit_flops': flops(fm_kwargs),
            'fm_store_flops': counter.get_total_flops() if count_flops else None,
            'cache_hit_s': timed(lambda: {'prefix': prefix}),
            'fm_hit_s': timed(fm_kwargs),
            'fm_store_s': median_seconds(store, args, device)}


def print_timed(args, rows, schedule, device):
    """Prints the measured and modelled seconds per step at every depth and the predicted savings; returns them for
    the JSON."""
    t0, f0, tl, fl = rows[0]['s_per_step'], rows[0]['flops'], rows[-1]['s_per_step'], rows[-1]['flops']
    # Affine refinement: a constant per-step term c fitted on the shallowest and the deepest depth,
    # time_k = c + (time_0 - c) * flops_k / flops_0. c > 0: fixed overheads (optimizer, launches);
    # c < 0: what freezing skips costs more than its FLOPs say (e.g. the HOG targets of skipped stages).
    c = (tl * f0 - t0 * fl) / (f0 - fl)
    print(f'\n{args.model} | {args.input_size}px | batch {args.batch_size} | {args.amp} | {device} x '
          f"{get_world_size()} | {'compiled' if args.compile else 'eager'} | median of {args.steps} steps, best of "
          f'{args.rounds} round(s)')
    print(' k  units stages  GFLOP/img  meas s/step  FLOP s/step  err %  affine s/step  err %   run %     steps')
    for r in rows:
        r['flop_model_s'], r['affine_model_s'] = t0 * r['flops'] / f0, c + (t0 - c) * r['flops'] / f0
        err = [100 * (r['s_per_step'] - m) / m for m in (r['flop_model_s'], r['affine_model_s'])]
        steps = r['run_fraction'] * args.epochs * args.steps_per_epoch
        print(f"{r['frozen']:2d} {r['active_units']:6d} {r['active_stages']:6d} {r['gflop_per_image']:10.3f} "
              f"{r['s_per_step']:12.4f} {r['flop_model_s']:12.4f} {err[0]:6.1f} {r['affine_model_s']:14.4f} "
              f"{err[1]:6.1f} {100 * r['run_fraction']:7.2f} {steps:9.0f}")
    saving = {'measured': 1 - sum(r['run_fraction'] * r['s_per_step'] for r in rows) / t0,
              'flop_model': 1 - sum(r['run_fraction'] * r['flops'] for r in rows) / f0,
              'analytic_encoder_beta2': analytic_saving(schedule)}
    equal_epochs = args.epochs * (1 - saving['measured'])
    print(f'\naffine term c = {c:.4f} s/step ({100 * c / t0:.1f}% of the depth-0 step)\n'
          f'schedule: {args.how_scale}, t_0 {args.t_0}, {args.epochs:g} epochs, {args.warmup_epochs:g} warmup; '
          f'first freeze at epoch {schedule.freeze_at[0]:.2f}\n'
          f"(a) predicted saving, measured per-depth times: {saving['measured']:.1%}\n"
          f"(b) predicted saving, FLOP model:                {saving['flop_model']:.1%}\n"
          f"(c) analytic encoder-only estimate (beta = 2):   {saving['analytic_encoder_beta2']:.1%} "
          f'(about 14.5% for 12 blocks, cubic 0.8, 10/100 warmup)\n'
          f'(d) equal-cost baseline: {equal_epochs:.1f} epochs '
          f'(warmup {args.warmup_epochs * equal_epochs / args.epochs:.1f} epochs keeps the warmup fraction)')
    return {'saving': saving, 'equal_cost_epochs': equal_epochs, 'affine_term_s': c}


def print_stored(args, rows):
    """The per-depth costs of the stored paths and the whole-run savings of the README's schedules (rank-sticky and,
    on several processes, the standard sampler): {unit: {sampler: {schedule: {variant: saving}}}}."""
    units = ('flops',) if args.flops_only else ('s', 'flops')
    for unit in units:
        print(f"\n k  {'s/step' if unit == 's' else 'GFLOP/img'}: exact  exact-cache hit  feature-masking hit  "
              'store miss extra')
        scale = 1 if unit == 's' else args.batch_size * 1e9
        for r in rows:
            print(f"{r['frozen']:2d} {(r['s_per_step'] if unit == 's' else r['flops']) / scale:17.4f} "
                  f"{r[f'cache_hit_{unit}'] / scale:16.4f} {r[f'fm_hit_{unit}'] / scale:20.4f} "
                  f"{r[f'fm_store_{unit}'] / scale:17.4f}")
    n = get_world_size()
    stored = {unit: {sampler: run_savings(rows, args.epochs, args.warmup_epochs, unit, n, sampler)
                     for sampler in (('sticky', 'standard') if n > 1 else ('sticky',))} for unit in units}
    for unit, by_sampler in stored.items():
        for sampler, by_schedule in by_sampler.items():
            for name, saving in by_schedule.items():
                print(f"predicted saving ({'measured s/step' if unit == 's' else 'FLOP model'}, {n} process(es), "
                      f"{'rank-sticky' if sampler == 'sticky' else 'standard'} sampler), {name} ({args.epochs:g} "
                      f'epochs, {args.warmup_epochs:g} warmup): ' + ', '.join(f'{k} {v:.1%}' for k, v in saving.items()))
    return stored


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:  # torchrun: DDP steps, the gradients all-reduced as in training
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    # Rounds: a fresh model each, frozen 0, 1, 2, ...; per depth the best round's median is kept, since
    # a round caught by a passing load spike (shared machine) can only read slower.
    sweeps = [sweep(args, device, count_flops=r == 0) for r in range(args.rounds)]
    (rows, schedule, fused), frac = sweeps[0], depth_fractions(sweeps[0][1])
    for k, r in enumerate(rows):
        if not args.flops_only:
            r['s_per_step_rounds'] = [s[0][k]['s_per_step'] for s in sweeps]
            r['s_per_step'] = min(r['s_per_step_rounds'])
            for name in ('cache_hit_s', 'fm_hit_s', 'fm_store_s') if args.feature_masking else ():  # FLOPs: round 0
                r[name] = min(s[0][k][name] for s in sweeps)
        r['gflop_per_image'], r['run_fraction'] = r['flops'] / args.batch_size / 1e9, frac[k]
    if not is_main_process():
        return
    res = {} if args.flops_only else print_timed(args, rows, schedule, device)
    stored = print_stored(args, rows) if args.feature_masking else None
    if args.json:
        cuda = device.type == 'cuda'
        res = {**vars(args), **res, 'stored_path_savings': stored, 'world_size': get_world_size(),
               'device': torch.cuda.get_device_name(device) if cuda else f'cpu ({torch.get_num_threads()} threads)',
               'fused_adamw': fused, 'depths': rows, 'torch': torch.__version__}
        with open(args.json, 'a') as f:
            f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
    main()
