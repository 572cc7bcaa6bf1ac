"""Whole-run saving of FreezeOut and its stored-prefix variants on N processes, from bench_freezeout.py's rows.

    python bench/bench_freezeout.py --model MIM_vit_base_patch16 --batch_size 2 --feature_masking --flops_only \
        --json vitb.jsonl
    python bench/freezeout_scaling.py vitb.jsonl --world_sizes 1 8 64

bench_freezeout.py gives, at every frozen depth k, the cost of one step on the exact path, served from the exact
cache (--freeze_cache), served from the feature-masking store, and the extra work of a feature-masking store miss.
Per sample, a step with a store costs a hit plus carrying the stored prefix on from the depth it was stored at
(the difference of the two prefixes), or a miss (the prefix computed from the image). A sample is in this process's
store if this process has loaded it since the store started (the first freeze; for feature masking the first epoch
that starts frozen, when the views become fixed): with the rank-sticky sampler after one epoch, with the standard
sampler each earlier epoch put it here with probability 1/N. The store is assumed to hold the data set.

All-reduce: DDP all-reduces the fp32 gradients of the trainable parameters only (frozen ones are re-bucketed out),
a ring moves 2 (N - 1) / N of their bytes over the bus bandwidth. It is added after the compute, not overlapped:
an upper bound on its cost (DDP hides part of it behind the backward), the FLOPs-only column being the lower one.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.freezeout.schedule import FreezeOutSchedule  # noqa: E402

SCHEDULES = (('cubic', 0.8), ('linear', 0.5))  # the README's FreezeOut runs
VARIANTS = ('freezeout', 'exact_cache', 'feature_masking')
# Bus bandwidth of an NCCL all-reduce per GPU, GB/s: one node over NVLink (H100 SXM, nccl-tests' typical busbw for
# large messages), and 8 nodes over one 400 Gb/s InfiniBand link per GPU.
BUS_GBPS = {2: 360.0, 8: 360.0, 64: 45.0}


def step_costs(rows, unit):
    """Per-depth arrays: exact step, exact-cache hit, its prefix, feature-masking hit, feature-masking prefix on all
    tokens. unit 's' (measured seconds per step) or 'flops' (per step of the sweep's batch)."""
    exact = np.array([r['s_per_step'] if unit == 's' else r['flops'] for r in rows], dtype=float)
    cache_hit, fm_hit, fm_store = (np.array([r[f'{name}_{unit}'] for r in rows], dtype=float)
                                   for name in ('cache_hit', 'fm_hit', 'fm_store'))
    return {'exact': exact, 'cache_hit': cache_hit, 'cache_prefix': np.maximum(exact - cache_hit, 0.0),
            'fm_hit': fm_hit, 'fm_prefix': fm_store}


def sample_costs(costs, variant, depth, stored_at):
    """(cost of a step at `depth` for a sample stored at depth `stored_at`, cost of a miss at `depth`)."""
    if variant == 'exact_cache':
        prefix = costs['cache_prefix']
        return costs['cache_hit'][depth] + prefix[depth] - prefix[stored_at], costs['exact'][depth]
    prefix = costs['fm_prefix']
    return costs['fm_hit'][depth] + prefix[depth] - prefix[stored_at], costs['fm_hit'][depth] + prefix[depth]


def step_profile(costs, schedule, variant, world_size=1, sampler='sticky', points_per_epoch=None):
    """(frozen depth, expected cost of a step) at evenly spaced points of the run, the stores as the module says."""
    epochs = int(round(schedule.epochs))
    per_epoch = points_per_epoch or max(20, min(400, 20000 // epochs))
    t = (np.arange(epochs * per_epoch) + 0.5) / per_epoch
    depth = np.array([schedule.frozen_units(x) for x in t])
    if variant == 'freezeout':
        return depth, costs['exact'][depth]
    first_freeze = schedule.freeze_at[0]
    start = first_freeze if variant == 'exact_cache' else math.ceil(first_freeze)
    rate = 1.0 if sampler == 'sticky' or world_size == 1 else 1.0 / world_size
    expected, not_stored = np.zeros_like(t), np.ones_like(t)
    for back in range(1, epochs):  # the visits of earlier epochs, newest first (same place in the epoch)
        earlier = np.arange(len(t)) - back * per_epoch
        here = np.where((earlier >= 0) & (t - back >= start), rate, 0.0)
        hit, _ = sample_costs(costs, variant, depth, depth[np.maximum(earlier, 0)])
        expected += not_stored * here * hit
        not_stored *= 1.0 - here
    expected += not_stored * sample_costs(costs, variant, depth, depth)[1]
    return depth, np.where(depth == 0, costs['exact'][0], expected)


def run_savings(rows, epochs, warmup_epochs, unit='flops', world_size=1, sampler='sticky', allreduce=None):
    """{schedule: {variant: whole-run saving against the unfrozen run}}. allreduce: (seconds per FLOP of the sweep's
    rows, bus bytes/s) to turn FLOPs into seconds and add the all-reduce of the trainable parameters."""
    costs, out = step_costs(rows, unit), {}
    comm = None
    if allreduce:
        seconds_per_flop, bus = allreduce
        costs = {k: v * seconds_per_flop for k, v in costs.items()}
        comm = 2 * (world_size - 1) / world_size * 4 * np.array([r['trainable_params'] for r in rows]) / bus
    for how, t_0 in SCHEDULES:
        schedule = FreezeOutSchedule(len(rows), how, t_0, epochs, warmup_epochs, 1e-4, 0.0)
        out[f'{how}_t0_{t_0}'] = {}
        for variant in VARIANTS:
            depth, cost = step_profile(costs, schedule, variant, world_size, sampler)
            if comm is not None:
                cost = cost + comm[depth]
            baseline = costs['exact'][0] + (comm[0] if comm is not None else 0.0)
            out[f'{how}_t0_{t_0}'][variant] = 1 - cost.mean() / baseline
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('json', help="bench_freezeout.py --feature_masking --json output (its last line)")
    p.add_argument('--world_sizes', type=int, nargs='+', default=[1, 8, 64])
    p.add_argument('--epochs', type=int, default=100)
    p.add_argument('--warmup_epochs', type=float, default=10)
    p.add_argument('--batch_per_gpu', type=int, default=256, help="the user's plan: --batch_size 256 per GPU")
    p.add_argument('--tflops', type=float, default=300.0, help='achieved bf16 TFLOP/s per GPU (H100: 989 peak)')
    p.add_argument('--bus_gbps', type=float, nargs='*', default=None,
                   help=f'all-reduce bus bandwidth per world size, GB/s (default {BUS_GBPS})')
    args = p.parse_args()
    with open(args.json) as f:
        res = json.loads(f.read().splitlines()[-1])
    rows = res['depths']
    bus = dict(zip(args.world_sizes, args.bus_gbps)) if args.bus_gbps else BUS_GBPS
    print(f"{res['model']} {res['input_size']}px, {args.epochs} epochs ({args.warmup_epochs:g} warmup); "
          f'all-reduce at {args.batch_per_gpu} images per GPU, {args.tflops:g} TFLOP/s, not overlapped')
    print('| GPUs | sampler | schedule | ' + ' | '.join(f'{v} (FLOPs / + all-reduce)' for v in VARIANTS) + ' |')
    print('|---|---|---|' + '---|' * len(VARIANTS))
    table = []
    for n in args.world_sizes:
        for sampler in ('sticky', 'standard') if n > 1 else ('sticky',):
            flops = run_savings(rows, args.epochs, args.warmup_epochs, 'flops', n, sampler)
            timed = run_savings(rows, args.epochs, args.warmup_epochs, 'flops', n, sampler,
                                (args.batch_per_gpu / res['batch_size'] / (args.tflops * 1e12), bus[n] * 1e9)) \
                if n > 1 else flops
            for name in flops:
                cells = [f'{flops[name][v]:.1%} / {timed[name][v]:.1%}' for v in VARIANTS]
                print(f"| {n} | {'rank-sticky' if sampler == 'sticky' else 'standard'} | {name} | "
                      + ' | '.join(cells) + ' |')
                table.append({'world_size': n, 'sampler': sampler, 'schedule': name, 'flops': flops[name],
                              'with_allreduce': timed[name]})
    return table


if __name__ == '__main__':
    main()
