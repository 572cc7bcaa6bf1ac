"""bench/freezeout_scaling.py: the whole-run saving of FreezeOut's stores on N processes, against a simulation of
the samplers and the per-process stores sample by sample."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
from freezeout_scaling import VARIANTS, run_savings  # noqa: E402
from util.freezeout.schedule import FreezeOutSchedule  # noqa: E402

UNITS = 13


def depth_rows():
    """Costs per step at frozen depth k = 0..12 (a prefix grows with k, a hit skips it) and trainable parameters."""
    rows = []
    for k in range(UNITS):
        exact = 1.0 - 0.05 * k
        prefix = 0.03 * k  # the frozen prefix on the visible tokens (part of the exact step)
        rows.append({'frozen': k, 's_per_step': exact, 'cache_hit_s': exact - prefix, 'fm_hit_s': exact - prefix,
                     'fm_store_s': 0.09 * k, 'trainable_params': 1000 * (UNITS - k)})
    return rows


def simulated_savings(rows, epochs, warmup, world_size, sticky, samples=480, seed=0):
    """Every sample of every epoch dealt to a process (sticky: the same process every epoch; standard: a fresh global
    shuffle split across the processes), each process keeping {sample: depth stored} from the store's start."""
    rng = random.Random(seed)
    out = {}
    for how, t_0 in (('cubic', 0.8), ('linear', 0.5)):
        schedule = FreezeOutSchedule(UNITS, how, t_0, epochs, warmup, 1e-4, 0.0)
        first = schedule.freeze_at[0]
        shards = [list(range(samples))[r::world_size] for r in range(world_size)]
        total = {variant: 0.0 for variant in VARIANTS}
        stores = {variant: [{} for _ in range(world_size)] for variant in VARIANTS}
        for epoch in range(epochs):
            if not sticky:
                order = list(range(samples))
                rng.shuffle(order)
                shards = [order[r::world_size] for r in range(world_size)]
            for rank, shard in enumerate(shards):
                shard = rng.sample(shard, len(shard)) if sticky else shard
                for position, sample in enumerate(shard):
                    t = epoch + (position + 0.5) / len(shard)
                    k = schedule.frozen_units(t)
                    r = rows[k]
                    prefix_cache = r['s_per_step'] - r['cache_hit_s']
                    for variant in VARIANTS:
                        store = stores[variant][rank]
                        if variant == 'freezeout' or k == 0:
                            total[variant] += r['s_per_step']
                            continue
                        storing = t >= first if variant == 'exact_cache' else epoch >= -(-first // 1)
                        if sample in store:
                            j = store[sample]
                            if variant == 'exact_cache':
                                total[variant] += r['cache_hit_s'] + prefix_cache - (
                                    rows[j]['s_per_step'] - rows[j]['cache_hit_s'])
                            else:
                                total[variant] += r['fm_hit_s'] + r['fm_store_s'] - rows[j]['fm_store_s']
                        else:
                            total[variant] += r['s_per_step'] if variant == 'exact_cache' else \
                                r['fm_hit_s'] + r['fm_store_s']
                        if storing:
                            store[sample] = k
        out[f'{how}_t0_{t_0}'] = {v: 1 - total[v] / (samples * epochs * rows[0]['s_per_step']) for v in VARIANTS}
    return out


@pytest.mark.parametrize('world_size, sampler', [(1, 'sticky'), (4, 'sticky'), (4, 'standard'), (16, 'standard')])
def test_the_saving_model_matches_a_sample_by_sample_simulation(world_size, sampler):
    rows = depth_rows()
    model = run_savings(rows, 12, 2, 's', world_size, sampler)
    simulated = simulated_savings(rows, 12, 2, world_size, sampler == 'sticky')
    for schedule in model:
        for variant in VARIANTS:
            assert model[schedule][variant] == pytest.approx(simulated[schedule][variant], abs=0.004), \
                (schedule, variant)


def test_stores_pay_off_only_where_samples_come_back_to_their_process():
    rows = depth_rows()
    sticky, standard = (run_savings(rows, 30, 3, 's', 8, sampler) for sampler in ('sticky', 'standard'))
    one = run_savings(rows, 30, 3, 's', 1)
    for schedule in one:
        assert sticky[schedule] == one[schedule]  # each process keeps its samples: the single-process saving
        assert standard[schedule]['freezeout'] == one[schedule]['freezeout']
        assert standard[schedule]['exact_cache'] < sticky[schedule]['exact_cache'] - 0.005
        assert one[schedule]['exact_cache'] > one[schedule]['freezeout']


def test_the_all_reduce_covers_only_trainable_parameters():
    """Equal compute at every depth: the whole saving is the all-reduce of the frozen parameters, by formula."""
    rows = [{**r, 'flops': 2.0, 'cache_hit_flops': 2.0, 'fm_hit_flops': 2.0, 'fm_store_flops': 0.0}
            for r in depth_rows()]
    world_size, bus, seconds_per_flop = 8, 1e6, 1e-3
    saving = run_savings(rows, 10, 1, 'flops', world_size, 'sticky', (seconds_per_flop, bus))
    schedule = FreezeOutSchedule(UNITS, 'cubic', 0.8, 10, 1, 1e-4, 0.0)
    grid = [(n + 0.5) / 400 for n in range(4000)]
    comm = [2 * 7 / 8 * 4 * rows[schedule.frozen_units(t)]['trainable_params'] / bus for t in grid]
    compute = 2.0 * seconds_per_flop
    expected = 1 - (compute + sum(comm) / len(comm)) / (compute + 2 * 7 / 8 * 4 * 13000 / bus)
    assert saving['cubic_t0_0.8']['freezeout'] == pytest.approx(expected, rel=1e-9)
    assert saving['cubic_t0_0.8']['freezeout'] > 0.01
    assert run_savings(rows, 10, 1, 'flops')['cubic_t0_0.8']['freezeout'] == pytest.approx(0.0, abs=1e-12)
