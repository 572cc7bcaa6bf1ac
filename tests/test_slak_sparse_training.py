"""SLaK's sparse training core (util/slak/sparse_training.py): mask initialisations, prune/grow, the hook under
AdamW and AMP, resume, EMA."""
import argparse
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import util.slak.sparse_training as st
from util.slak.sparse_training import CosineDecay, Masking, add_sparse_args, erk_densities, masked_ema_update
from helpers import free_port, gloo_group
from util.slak.hooks import MaskedEmaHook
from util.train_step import TrainStep


class LargeKernel(nn.Module):
    def __init__(self, c, k=7, s=3):
        super().__init__()
        self.LoRA1 = nn.Sequential()
        self.LoRA1.conv = nn.Conv2d(c, c, (k, s), padding=(k // 2, s // 2), groups=c, bias=False)
        self.LoRA2 = nn.Sequential()
        self.LoRA2.conv = nn.Conv2d(c, c, (s, k), padding=(s // 2, k // 2), groups=c, bias=False)
        self.small_conv = nn.Sequential()
        self.small_conv.conv = nn.Conv2d(c, c, s, padding=s // 2, groups=c, bias=False)
        self.small_conv.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.LoRA1(x) + self.LoRA2(x) + self.small_conv(x)


class TinySLaK(nn.Module):
    """SLaK's parameter names on a few-thousand-weight network."""

    def __init__(self, c=16, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.large_kernel = LargeKernel(c)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.large_kernel(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.pwconv2(F.gelu(self.pwconv1(x)))
        return self.head(x.mean((1, 2)))


def batch(i, n=4):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def build(sparse_init='uniform', density=0.6, growth='random', u=3, seed=0, prune_rate=0.5, opt='adamw', **kw):
    torch.manual_seed(seed)
    model = TinySLaK()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2) if opt == 'adamw'
                 else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    masking = Masking(optimizer, prune_rate, growth, prune_rate_decay=CosineDecay(prune_rate, 100),
                      update_frequency=u, **kw)
    masking.add_module(model, sparse_init, density, snip_loss=batch(0))
    return model, optimizer, masking


def eligible(model):
    return {n: p for n, p in model.named_parameters() if p.dim() in (2, 4)}


def train(model, optimizer, hooks, steps, start=0, amp='none'):
    trainer = TrainStep(model, optimizer, 'cpu', amp=amp)
    for i in range(start, start + steps):
        x, y = batch(i)
        with trainer.autocast():
            loss = F.cross_entropy(model(x), y)
        trainer.backward(loss)
        trainer.step(hooks)
    return trainer


@pytest.mark.parametrize('sparse_init', ['uniform', 'ERK', 'snip'])
def test_init_reaches_overall_density(sparse_init):
    model, _, masking = build(sparse_init, density=0.6)
    weights = eligible(model)
    nonzero = sum(int((p != 0).sum()) for p in weights.values())
    total = sum(p.numel() for p in weights.values())
    assert nonzero / total == pytest.approx(0.6, abs=0.03)
    assert masking.densities()['density'] == pytest.approx(nonzero / total, abs=1e-9)
    for n, m in masking.masks.items():  # masks are the weights' zero pattern, nearly-dense layers are dropped
        assert torch.equal(m, weights[n] != 0) and m.float().mean() < st.DENSE_AFTER_INIT
    assert set(masking.masks) | set(masking.dense) == set(weights)


def test_erk_formula_and_resume_init():
    shapes = {'a': (64, 64), 'b': (16, 1, 3, 3), 'c': (5, 16)}
    d = erk_densities(shapes, 0.5)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(0.5 * sum(numel.values()))
    assert d['b'] == d['c'] == 1.0 and d['a'] == pytest.approx((0.5 * sum(numel.values()) - 224) / 4096)
    model = TinySLaK()
    with torch.no_grad():
        model.pwconv1.weight[:, :3] = 0
    masking = Masking(torch.optim.SGD(model.parameters(), lr=0.1), update_frequency=10)
    masking.add_module(model, 'resume', 0.6)
    assert list(masking.masks) == ['pwconv1.weight'] and masking.masks['pwconv1.weight'][:, 3:].all()
    assert not masking.masks['pwconv1.weight'][:, :3].any()


def test_only_L_masks_only_the_large_kernel_strips():
    torch.manual_seed(0)
    model = TinySLaK()
    masking = Masking(torch.optim.SGD(model.parameters(), lr=0.1))
    masking.add_module(model, 'uniform', 0.6, only_L=True)
    assert list(masking.masks) == ['large_kernel.LoRA1.conv.weight', 'large_kernel.LoRA2.conv.weight']
    assert model.large_kernel.small_conv.conv.weight.ne(0).all() and model.pwconv1.weight.ne(0).all()
    with pytest.raises(ValueError, match='--only-L'):
        Masking(torch.optim.SGD(model.parameters(), lr=0.1)).add_module(nn.Linear(3, 3), 'uniform', 0.6, only_L=True)


@pytest.mark.parametrize('growth', ['gradient', 'momentum', 'random'])
def test_prune_grow_keeps_layer_density(growth):
    model, optimizer, masking = build(density=0.5, growth=growth, u=2)
    before = {n: int(m.sum()) for n, m in masking.masks.items()}
    old = {n: m.clone() for n, m in masking.masks.items()}
    train(model, optimizer, [masking], 2)
    assert masking.steps == 2 and masking.prune_rate == pytest.approx(CosineDecay(0.5, 100, init_step=2).get_dr())
    for n, m in masking.masks.items():
        pruned, grown = masking.last_event[n]
        assert pruned == math.ceil(masking.prune_rate * before[n])
        assert not torch.equal(m, old[n])
        if growth == 'random':  # official: density kept in expectation (binomial, a few sd)
            assert abs(int(m.sum()) - before[n]) <= 4 * math.sqrt(pruned) + 1
        else:
            assert grown == pruned and int(m.sum()) == before[n]
        assert (eligible(model)[n][~m] == 0).all()


def test_magnitude_prune_then_gradient_and_momentum_growth_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [0.0, 0.3, -3.0, 0.0]])
    grad = torch.tensor([[7.0, 9.0, -0.2, 9.0], [5.0, 9.0, 9.0, -0.7]])  # large at active positions: ignored
    adam_v = torch.full_like(w, 4.0)
    adam_v[1, 3] = 100.0  # Adam's score m / (sqrt(v) + eps): 0.2 / 2 at (0,2) beats 0.7 / 10 at (1,3)
    for growth, opt, last in (('gradient', 'adamw', (1, 3)), ('momentum', 'sgd', (1, 3)),
                              ('momentum', 'adamw', (0, 2))):
        lin = nn.Linear(4, 2, bias=False)
        optimizer = (torch.optim.AdamW(lin.parameters(), lr=0.1) if opt == 'adamw'
                     else torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9))
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.weight.grad = grad.clone()
        masking = Masking(optimizer, prune_rate=0.4, growth_mode=growth, update_frequency=1)
        masking.add_module(lin, 'resume', 0.6)
        if growth == 'momentum':  # set after add_module, which masks SGD's momentum buffer
            optimizer.state[lin.weight] = ({'exp_avg': grad.clone(), 'exp_avg_sq': adam_v} if opt == 'adamw'
                                           else {'momentum_buffer': grad.clone()})
        mask = masking.masks['weight']
        assert masking.prune('weight') == 2  # ceil(0.4 * 5): the two active weights of smallest |w|
        assert mask.int().tolist() == [[1, 0, 0, 1], [0, 0, 1, 0]]
        assert masking.grow('weight', 3) == 3  # the largest scores at zero positions, just-pruned ones included
        assert mask.int().tolist() == [[1, 1, 0, 1], [1, 1, 1, 0]]
        masking.grow('weight', 1)
        assert mask[last] and mask.sum() == 7, (growth, opt)


@pytest.mark.parametrize('amp', ['bf16', 'none'])
def test_masked_weights_stay_zero_with_adamw_amp_and_skipped_steps(amp):
    model, optimizer, masking = build(density=0.5, growth='momentum', u=2)
    start = {n: p.detach().clone() for n, p in eligible(model).items()}
    trainer = train(model, optimizer, [masking], 5, amp=amp)
    for n, m in masking.masks.items():
        p = eligible(model)[n]
        assert (p[~m] == 0).all() and (p[m] != start[n][m]).any()
    assert optimizer.state[model.pwconv1.weight]['exp_avg'][~masking.masks['pwconv1.weight']].ne(0).any()
    x, y = batch(0)  # a non-finite step is skipped but still masked and counted
    with trainer.autocast():
        loss = F.cross_entropy(model(x), y) * float('nan')
    trainer.backward(loss)
    trainer.step([masking])
    assert int(trainer.skipped) == 1 and masking.steps == 6
    for n, m in masking.masks.items():
        assert (eligible(model)[n][~m] == 0).all() and torch.isfinite(eligible(model)[n]).all()


def test_fix_keeps_masks_static():
    model, optimizer, masking = build(fix=True, u=None)
    old = {n: m.clone() for n, m in masking.masks.items()}
    train(model, optimizer, [masking], 4)
    assert masking.update_frequency is None and all(torch.equal(m, old[n]) for n, m in masking.masks.items())


def test_state_dict_round_trip_restores_masks_exactly():
    model, optimizer, masking = build(u=2)
    train(model, optimizer, [masking], 3)
    buf = io.BytesIO()
    torch.save(masking.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other_model, other_opt, other = build('ERK', seed=1, u=2)
    with torch.no_grad():
        other_model.pwconv1.weight.fill_(1.0)
    other.load_state_dict(state)
    assert list(other.masks) == list(masking.masks)
    assert all(torch.equal(other.masks[n], m) for n, m in masking.masks.items())
    assert (other.steps, other.prune_rate, other.prune_rate_decay.t) == (3, masking.prune_rate, 3)
    assert other.dense == masking.dense and other.last_event == masking.last_event
    assert (other_model.pwconv1.weight[~other.masks['pwconv1.weight']] == 0).all()  # re-applied
    with pytest.raises(ValueError, match='do not fit'):
        Masking(optimizer).load_state_dict(state, model=nn.Linear(2, 2))
    on_meta = Masking(optimizer)  # a model on another device than the saved masks (a GPU run resumed from a file)
    on_meta.load_state_dict(state, model=TinySLaK().to('meta'))
    assert {m.device.type for m in on_meta.masks.values()} == {'meta'}


def test_momentum_growth_before_any_optimizer_state_scores_zero():
    model, optimizer, masking = build(growth='momentum', opt='sgd')  # no step yet: no momentum buffer
    for name, p in masking.params.items():
        assert torch.equal(masking.growth_score(name), torch.zeros_like(p))


def test_snip_scores_keep_the_weights_above_the_kth_largest_score():
    """|w * dL/dw| with dL/dw = 1: scores 1, 2, 3, 4; density 0.5 keeps k = 2 scores, those above the 2nd largest."""
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -1.0, 4.0, 2.0]]))
    assert st.snip_densities(model, ['weight'], 0.5, lambda net: net.weight.sum()) == {'weight': 0.25}


class DeviceRecorder:
    """A batch tensor that records the device it is moved to."""

    def __init__(self, tensor, moved):
        self.tensor, self.moved = tensor, moved

    def to(self, device):
        self.moved.append(device)
        return self.tensor


def test_a_snip_batch_is_moved_to_the_models_device():
    model, moved = TinySLaK(), []
    batch = (DeviceRecorder(torch.randn(4, 3, 8, 8), moved), DeviceRecorder(torch.tensor([0, 1, 2, 3]), moved))
    Masking(torch.optim.SGD(model.parameters(), lr=0.1)).add_module(model, 'snip', 0.5, snip_loss=batch)
    assert moved == [torch.device('cpu')] * 2


def test_resumed_run_equals_uninterrupted_run():
    model, optimizer, masking = build(u=3, opt='sgd')  # SGD: momentum buffers are masked too
    train(model, optimizer, [masking], 6)  # events at steps 3 and 6

    model_a, opt_a, mask_a = build(u=3, opt='sgd')
    train(model_a, opt_a, [mask_a], 4)
    ckpt = {'model': model_a.state_dict(), 'optimizer': opt_a.state_dict(), 'masks': mask_a.state_dict(),
            'rng': torch.get_rng_state()}
    model_b, opt_b, mask_b = build('snip', seed=7, u=3, opt='sgd')  # a fresh process draws other masks
    model_b.load_state_dict(ckpt['model'])
    opt_b.load_state_dict(ckpt['optimizer'])
    mask_b.load_state_dict(ckpt['masks'])
    torch.set_rng_state(ckpt['rng'])
    train(model_b, opt_b, [mask_b], 2, start=4)
    assert mask_b.steps == 6 and mask_b.last_event == masking.last_event
    assert all(torch.equal(mask_b.masks[n], m) for n, m in masking.masks.items())
    for (n, p), q in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(p, q), n


def official_prune_rates(p0, T, steps, eta_min=0.005):
    """The rates the official CosineDecay reads: CosineAnnealingLR's recursive (chainable) form, by hand."""
    lr, rates = p0, []
    for t in range(1, steps + 1):
        if (t - 1 - T) % (2 * T) == 0:
            lr = lr + (p0 - eta_min) * (1 - math.cos(math.pi / T)) / 2
        else:
            lr = (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta_min) + eta_min
        rates.append(lr)
    return rates


def test_prune_rate_schedule_is_the_official_recursive_cosine():
    decay = CosineDecay(0.3, 10)
    rates = []
    for _ in range(10):
        decay.step()
        rates.append(decay.get_dr())
    assert rates == official_prune_rates(0.3, 10, 10)  # bit for bit
    closed = [0.005 + (0.3 - 0.005) * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(1, 11)]
    assert rates == pytest.approx(closed, abs=1e-15) and rates != closed  # the closed form differs in the last bit
    resumed = CosineDecay(0.3, 10, init_step=4)
    assert resumed.get_dr() == rates[3]
    resumed.load_state_dict({'t': 7})
    assert resumed.get_dr() == rates[6] and resumed.t == 7
    # SLaK-T: 93,600 steps, u = 2000: the first event prunes at about 0.499
    assert CosineDecay(0.5, 93600, init_step=2000).get_dr() == pytest.approx(0.4994, abs=1e-4)


def test_active_weights_at_exactly_zero_are_pruned_as_the_official_rule_prunes_them():
    """100 weights, 60 active of which 20 are exactly 0 (taps that never see data), rate 0.1: the official rule
    deactivates the 40 + ceil(0.1 x 60) = 46 smallest |w| of the whole tensor, and the zero-valued active weights
    among them go on top of the 6."""
    torch.manual_seed(0)
    weight = torch.randn(10, 10)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.randperm(100)[:60]] = True
    active_zero = mask.nonzero().flatten()[torch.randperm(60)[:20]]
    weight.view(-1)[active_zero] = 0.0
    weight.view(-1)[~mask] = 0.0  # inactive weights are 0 after apply_mask
    mask = mask.view(10, 10)
    official = mask.float()  # funcs.py magnitude_prune, on the float mask the official code keeps
    num_remove = math.ceil(0.1 * 60)
    official.view(-1)[torch.sort(weight.abs().view(-1))[1][:40 + num_remove]] = 0.0
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    masking = Masking(torch.optim.SGD(lin.parameters(), lr=0.1), prune_rate=0.1)
    masking.add_module(lin, 'resume', 0.6)
    masking.masks['weight'].copy_(mask)
    removed = masking.prune('weight')
    assert removed == 60 - int(official.sum()) and removed > num_remove  # 16 in this draw, not 6
    assert torch.equal(masking.masks['weight'], official.bool())
    masking.prune_rate = 0.0  # nothing to remove: every zero-valued weight goes (the official `weight != 0`)
    left = int((masking.masks['weight'] & (weight == 0)).sum())
    assert left > 0 and masking.prune('weight') == left
    assert torch.equal(masking.masks['weight'], official.bool() & (weight != 0))


def test_masked_ema_update_by_hand():
    model = nn.Linear(3, 1, bias=True)
    ema = nn.Linear(3, 1, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        model.bias.fill_(4.0)
        ema.weight.copy_(torch.tensor([[10.0, 0.0, 30.0]]))  # position 1 was inactive: EMA is 0 there
        ema.bias.fill_(8.0)
    masks = {'weight': torch.tensor([[True, True, False]])}  # 1 newly grown, 2 just pruned
    masked_ema_update(ema, model, masks, 0.9)
    assert ema.weight.tolist()[0] == pytest.approx([10 * 0.9 + 0.1, 2.0, 0.0])
    assert ema.bias.item() == pytest.approx(8 * 0.9 + 0.4)
    bn, bn_ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    bn.num_batches_tracked.fill_(7)
    masked_ema_update(bn_ema, bn, {}, 0.5)
    assert bn_ema.num_batches_tracked.item() == 3  # 3.5 truncated, as officially


def test_ema_hook_follows_masks_through_training():
    model, optimizer, masking = build(u=2)
    ema = MaskedEmaHook(model, masking, decay=0.5)
    train(model, optimizer, [masking, ema], 3)
    before = {n: m.clone() for n, m in masking.masks.items()}
    train(model, optimizer, [masking, ema], 2, start=3)  # an event at step 4, then one more step
    for n, m in masking.masks.items():
        e, p, grown = ema.module.get_parameter(n), model.get_parameter(n), m & ~before[n]
        assert (e[~m] == 0).all() and grown.any()
        assert torch.equal(e[grown], p[grown])  # grown at 0 at step 4: the EMA copies the live weights
    assert set(ema.state_dict()) == set(model.state_dict())
    other = TinySLaK()
    masking.apply_to(other)
    assert all((other.get_parameter(n)[~m] == 0).all() and (other.get_parameter(n)[m] != 0).all()
               for n, m in masking.masks.items())


def test_densities_log_per_layer_and_overall(capsys):
    model, optimizer, masking = build(density=0.5)
    assert 'overall density' in capsys.readouterr().out
    stats = masking.densities()
    assert set(stats) == {'density', 'nonzero_params'} | {f'density/{n}' for n in masking.masks}
    assert stats['nonzero_params'] == sum(int((p != 0).sum()) for p in model.parameters() if p.dim() in (2, 4)) + \
        sum(p.numel() for p in model.parameters() if p.dim() not in (2, 4))
    assert all(isinstance(v, float) for v in stats.values())


def test_masks_broadcast_only_when_they_change(monkeypatch):
    calls = []
    monkeypatch.setattr(st.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(st.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(st.dist, 'broadcast', lambda t, src: calls.append((t.dtype, t.numel(), src)))
    model, optimizer, masking = build(u=3)
    assert len(calls) == 1 and calls[0][0] == torch.uint8 and calls[0][2] == 0  # at init, before dropping dense
    train(model, optimizer, [masking], 7)
    assert len(calls) == 3 and calls[-1][1] == sum(m.numel() for m in masking.masks.values())


def _ddp_worker(rank, port, out_dir):
    with gloo_group(rank, 2, port):
        torch.manual_seed(rank)  # per-rank seeds: different mask draws and random growth on each rank
        model = DistributedDataParallel(TinySLaK())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        masking = Masking(optimizer, 0.5, 'random', update_frequency=2)
        masking.add_module(model, 'uniform', 0.6)
        train(model, optimizer, [masking], 4, start=2 * rank)
        torch.save({'masks': masking.masks, 'weights': dict(model.module.named_parameters())},
                   os.path.join(out_dir, f'{rank}.pt'))


def test_ddp_ranks_share_masks_keyed_by_bare_names(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert list(r0['masks']) == list(r1['masks']) and not any(n.startswith('module.') for n in r0['masks'])
    assert all(torch.equal(m, r1['masks'][n]) for n, m in r0['masks'].items())
    assert all(torch.equal(v, r1['weights'][k]) for k, v in r0['weights'].items())  # BN stats are per rank


def test_bad_flags_raise_clear_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    with pytest.raises(ValueError, match='--growth'):
        Masking(opt, growth_mode='mix')
    with pytest.raises(ValueError, match='--prune'):
        Masking(opt, prune_mode='SET')
    with pytest.raises(ValueError, match='--update-frequency'):
        Masking(opt, update_frequency=0)
    with pytest.raises(ValueError, match='--sparse_init'):
        Masking(opt).add_module(TinySLaK(), 'lottery', 0.6)
    with pytest.raises(ValueError, match='snip'):
        Masking(opt).add_module(TinySLaK(), 'snip', 0.6)
    args = add_sparse_args(argparse.ArgumentParser()).parse_args([])
    for sparsity in (1.0, -0.1, 1.5):
        args.sparsity = sparsity
        with pytest.raises(ValueError, match='--sparsity'):
            Masking.from_args(opt, args, total_steps=10)


def test_add_sparse_args_official_names_and_defaults():
    args = add_sparse_args(argparse.ArgumentParser()).parse_args([])
    assert vars(args) == dict(sparse=False, sparsity=0.4, sparse_init='snip', prune='magnitude', growth='random',
                              redistribution='none', prune_rate=0.3, update_frequency=100, fix=False, only_L=False,
                              verbose=False)
    args = add_sparse_args(argparse.ArgumentParser()).parse_args(['--sparse', '-u', '2000', '--only-L', '--fix'])
    assert (args.sparse, args.update_frequency, args.only_L, args.fix) == (True, 2000, True, True)
    optimizer = torch.optim.SGD(TinySLaK().parameters(), lr=0.1)
    masking = Masking.from_args(optimizer, args, total_steps=50)
    assert masking.update_frequency is None and masking.prune_rate_decay.T_max == 50
    assert masking.optimizer is optimizer  # momentum growth reads its state
    for mode in ('none', 'momentum', 'magnitude', 'nonzeros'):  # the official choices, accepted though unused
        Masking(optimizer, redistribution_mode=mode)
    help_text = ' '.join(add_sparse_args(argparse.ArgumentParser()).format_help().split())
    for text in ('--sparse_init SPARSE_INIT mask initialisation: uniform, ERK, snip, resume --prune',
                 '--growth GROWTH growth mode: random, gradient, momentum --redistribution',
                 '--redistribution REDISTRIBUTION unused (as in the official code) --prune_rate',
                 '--fix static masks (no prune/grow) --only-L',
                 '--verbose per-layer counts at every prune/grow event'):
        assert text in help_text
