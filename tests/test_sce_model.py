"""SCE model side (models/sce.py, models/r3d.py): loss golden values and a NumPy restatement, the R3D-18
trunk, heads, momentum target, queue, hooks, flags, and the 2-process queue gather."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from helpers import free_port, gloo_group
from models.r3d import r3d18_trunk
from main_sce import add_sce_model_args, build_sce, check_sce_args
from models.sce import SCE, momentum_value, sce_loss, scheduler_value
from util.sce.hooks import SCEHook
from util.sce.optim import build_lars, sce_param_groups
from util.train_step import TrainStep


# ------------------------------------------------------------------------------------------------ loss

def toy():
    f = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    q, k = f([[1, 2], [3, 4], [5, 6], [7, 8]]), f([[0, 0], [1, 1], [0, 0], [1, 1]])
    return q, k, f([[0, 0, 0, 2], [0, 0, 0, 2]])


def test_loss_golden_values():
    q, k, queue = toy()
    assert sce_loss(q, k, queue, 0.5, 0.1, 0.07).item() == pytest.approx(90.5, abs=1e-9)
    assert sce_loss(q, k, queue, 0.5, 0.1, 0.07, k_global=k, use_keys=True).item() == pytest.approx(87.5, abs=1e-9)
    assert sce_loss(q, k, None, 0.5, 0.1, 0.07, k_global=k, use_keys=True).item() == pytest.approx(
        24.0264805139, abs=1e-9)


def numpy_sce(q, k, queue, coeff, temp, temp_m, k_global=None, use_keys=False, rank=0):
    """SCE's loss one sample at a time: cross-entropy of the online logits (temperature temp) against the mix of
    the positive (weight coeff) and the softmax of the target logits (temperature temp_m)."""
    q, k = q.numpy(), k.numpy()
    queue = None if queue is None else queue.numpy()
    kg = k if k_global is None else k_global.numpy()
    total = 0.0
    for i in range(len(q)):
        if use_keys:
            online, target, pos = list(kg @ q[i]), list(kg @ k[i]), rank * len(q) + i
            target[pos] -= 1e9
        else:
            online, target, pos = [q[i] @ k[i]], [0.0], 0  # the positive's target logit is 0, not -inf
        if queue is not None:
            online += list(q[i] @ queue)
            target += list(k[i] @ queue)
        online, target = np.array(online) / temp, np.array(target) / temp_m
        s = np.exp(target - target.max())
        s /= s.sum()
        w = (1 - coeff) * s
        w[pos] += coeff
        w /= w.sum()
        log_p = online - online.max() - np.log(np.exp(online - online.max()).sum())
        total += -(w * log_p).sum()
    return total / len(q)


@pytest.mark.parametrize('use_keys,with_queue,rank', [(False, True, 0), (True, True, 0), (True, False, 0),
                                                      (True, True, 1)])
def test_loss_matches_numpy_and_gradcheck(use_keys, with_queue, rank):
    g = torch.Generator().manual_seed(0)
    n = lambda *s: nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa
    q, k = n(8, 16).requires_grad_(), n(8, 16)
    queue = n(32, 16).T.contiguous() if with_queue else None
    k_global = torch.cat([n(8, 16), k]) if rank == 1 else k  # this rank's keys in their rank-ordered place
    args = (0.7, 0.1, 0.05)  # a coeff float32 cannot hold: a float32 step inside shows at 1e-9
    loss = sce_loss(q, k, queue, *args, k_global=k_global, use_keys=use_keys, rank=rank)
    ref = numpy_sce(q.detach(), k, queue, *args, k_global=k_global, use_keys=use_keys, rank=rank)
    assert loss.item() == pytest.approx(ref, abs=1e-12, rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda q_: sce_loss(q_, k, queue, *args, k_global=k_global, use_keys=use_keys, rank=rank), (q,))


def test_loss_without_queue_or_keys_is_rejected_and_degenerate():
    q, k, _ = toy()
    assert sce_loss(q, k, None, 0.5, 0.1, 0.07).item() == 0.0  # one column: identically 0
    with pytest.raises(ValueError, match='--use_keys'):
        tiny_sce(queue_size=0)


def test_schedulers():
    assert scheduler_value(None, 1.0, 0.5, 3, 9) == 1.0
    assert scheduler_value('linear', 1.0, 0.5, 3, 9) == pytest.approx(1.0 - 0.5 * 3 / 9)
    assert scheduler_value('linear', 0.5, 1.0, 0, 9) == 0.5  # the official one would start at 1.0
    assert scheduler_value('cosine', 0.1, 0.05, 9, 9) == pytest.approx(0.05)
    # eztorch's arithmetic (utils.scheduler_value), bit for bit: float64 runs then agree to rounding
    for step in range(12):
        rise = 0.5 * (1.0 + math.cos(math.pi + math.pi * step / 11))
        assert scheduler_value('cosine', 0.07, 0.05, step, 11) == 0.07 - rise * (0.07 - 0.05)
        assert scheduler_value('cosine', 0.05, 0.07, step, 11) == 0.05 + rise * (0.07 - 0.05)
        assert scheduler_value('linear', 1.0, 0.5, step, 11) == 1.0 + step * (0.5 - 1.0) / 11
    sce = tiny_sce(steps_per_epoch=10, epochs=4, warmup_epoch_coeff=2, scheduler_coeff='cosine',
                   warmup_epoch_temp_m=1, start_warmup_temp_m=0.1)
    sce.global_step = 0
    assert (sce.current_coeff(), sce.current_temp_m()) == (1.0, pytest.approx(0.1))
    sce.global_step = 19
    assert (sce.current_coeff(), sce.current_temp_m()) == (pytest.approx(0.5), 0.05)
    sce.global_step = 20
    assert sce.current_coeff() == pytest.approx(0.5)
    sce.global_step = 39
    assert sce.current_coeff() == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------ architecture

def test_r3d18_trunk_shapes_init_and_keys():
    trunk = r3d18_trunk()
    assert sum(p.numel() for p in trunk.parameters()) == 20_023_872  # the reference trunk's size
    x = torch.randn(2, 3, 4, 32, 32)
    assert trunk.model(x).shape == (2, 512, 4, 1, 1)
    assert trunk(x).shape == (2, 512)
    for name, m in trunk.named_modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.all(m.weight == (0.0 if name.endswith('branch2.norm_b') else 1.0)), name
            assert torch.all(m.bias == 0)
    keys = trunk.state_dict()
    shapes = {'model.blocks.0.conv.weight': (64, 3, 1, 7, 7),
              'model.blocks.1.res_blocks.0.branch2.conv_a.weight': (64, 64, 1, 3, 3),
              'model.blocks.3.res_blocks.0.branch2.conv_a.weight': (256, 128, 3, 3, 3),
              'model.blocks.3.res_blocks.1.branch2.conv_b.weight': (256, 256, 1, 3, 3),
              'model.blocks.2.res_blocks.0.branch1_conv.weight': (128, 64, 1, 1, 1),
              'model.blocks.2.res_blocks.0.branch1_norm.weight': (128,)}
    for k, s in shapes.items():
        assert keys[k].shape == s
    assert 'model.blocks.1.res_blocks.0.branch1_conv.weight' not in keys  # identity shortcut in stage 1


def test_heads_match_the_reference_sizes():
    sce = build_sce(add_sce_model_args(argparse.ArgumentParser()).parse_args([]), trunk=TinyTrunk(512),
                    queue_size=64)
    assert sum(p.numel() for p in sce.projector.parameters()) == 1_839_104
    assert sum(p.numel() for p in sce.predictor.parameters()) == 526_336
    last = sce.projector.layers[7]
    assert isinstance(last, nn.BatchNorm1d) and last.weight is None
    assert isinstance(sce.predictor.layers[-1], nn.Linear) and len(sce.predictor.layers) == 4
    assert all(m.bias is None for m in sce.modules() if isinstance(m, nn.Linear) and m is not getattr(
        sce.online_evaluator, 'linear', None))


# ------------------------------------------------------------------------------------------------ the model

class TinyTrunk(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.num_features = width
        self.model = nn.Sequential(nn.Conv3d(3, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.model(x))


def tiny_sce(**kw):
    kw = {'trunk': TinyTrunk(), 'queue_size': 16, 'queue_feature_dim': 8, 'projector_hidden_dims': (16,),
          'projector_output_dim': 8, 'predictor_hidden_dims': (16,), 'predictor_output_dim': 8, **kw}
    return SCE(**kw)


def clips(n_views=2, batch=4, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 2, size, size, generator=g) for _ in range(n_views)]


@pytest.mark.parametrize('sym', [True, False])
def test_forward_is_the_cross_view_aggregation(sym):
    torch.manual_seed(0)
    sce = tiny_sce(sym=sym)
    views = clips()
    loss, logs = sce(views)
    (_, _, q0), (_, _, q1) = sce._online(views)  # train-mode BN: the same batch statistics again
    z0, z1 = sce._target(views)
    args = (sce.queue, 0.5, 0.1, 0.05)
    expected = (sce_loss(q1, z0, *args) + sce_loss(q0, z1, *args)) / 2 if sym else sce_loss(q1, z0, *args)
    torch.testing.assert_close(loss, expected)
    assert set(logs) >= {'coeff', 'temp_m', 'momentum', 'pos_weight', 'z_std', 'k_std', 'queue_fill'}
    assert all(torch.is_tensor(v) and not v.requires_grad and v.ndim == 0 for v in logs.values())
    assert 0 < logs['pos_weight'] < 1 and logs['queue_fill'] == 0


def test_multi_crop_and_mutual_pass():
    torch.manual_seed(0)
    sce = tiny_sce(num_local_crops=2)
    views = clips(2) + clips(2, size=4, seed=1)
    loss, _ = sce(views)
    outs, targets = sce._online(views), sce._target(views[:2])
    terms = [sce_loss(outs[j][2], targets[i], sce.queue, 0.5, 0.1, 0.05) for i in range(2) for j in range(4) if i != j]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    sce.mutual_pass = True
    loss_mutual, _ = sce(views)
    assert torch.isfinite(loss_mutual) and not torch.allclose(loss, loss_mutual)  # shared BN statistics
    with pytest.raises(ValueError, match='expects 4 views'):
        sce(views[:2])


def test_gradients_reach_only_the_online_branch():
    sce = tiny_sce(num_classes=3)
    loss, logs = sce(clips(), labels=torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, p in sce.named_parameters():
        if name.startswith(('trunk.', 'projector.', 'predictor.')):
            assert p.grad is not None, name
        elif name.startswith('momentum_'):
            assert p.grad is None and not p.requires_grad, name
    assert {'online_loss', 'online_acc1'} <= set(logs)
    ids = {id(p) for g in sce_param_groups(sce, 1e-6) for p in g['params']}
    assert ids == {id(p) for n, p in sce.named_parameters() if n.startswith(('trunk.', 'projector.', 'predictor.'))}


def test_queue_init_enqueue_order_wraparound_and_snapshot():
    torch.manual_seed(0)
    sce = tiny_sce(queue_size=12)
    torch.testing.assert_close(sce.queue.norm(dim=0), torch.ones(12))
    before = sce.queue.clone()
    views = clips(batch=4)
    sce(views)
    assert torch.equal(sce.queue, before)  # forward leaves the queue alone: every term uses the same queue
    z0, z1 = sce._target(views)
    sce.enqueue_pending()
    torch.testing.assert_close(sce.queue[:, :8], torch.cat([z0, z1]).T)  # [view0 ; view1]
    assert torch.equal(sce.queue[:, 8:], before[:, 8:]) and sce.queue_ptr.item() == 8
    sce(views)
    sce.enqueue_pending()  # 8 more keys: 4 at the end, then wrap to the start
    keys = torch.cat([z0, z1]).T
    torch.testing.assert_close(sce.queue[:, 8:], keys[:, :4])
    torch.testing.assert_close(sce.queue[:, :4], keys[:, 4:])
    assert sce.queue_ptr.item() == 4
    sce.eval()
    sce(views)
    assert sce._pending_keys == []  # evaluation passes never feed the queue


def test_momentum_schedule_and_ema():
    assert momentum_value(0, 101, 0.99) == 0.99
    assert momentum_value(50, 101, 0.99) == pytest.approx(0.995)
    assert momentum_value(100, 101, 0.99) == pytest.approx(1.0)
    assert momentum_value(7, 101, 0.99, 'constant') == 0.99
    assert momentum_value(25, 40, 0.9, 'cosine_epoch', steps_per_epoch=10) == pytest.approx(
        1 - 0.1 * (np.cos(np.pi * 2 / 3) + 1) / 2)
    torch.manual_seed(0)
    sce = tiny_sce(steps_per_epoch=5, epochs=2)
    target_buffers = {k: v.clone() for k, v in sce.momentum_trunk.state_dict().items() if 'running' in k}
    opt = build_lars(sce, lr=0.1)
    trainer = TrainStep(sce, opt, 'cpu')
    hook = SCEHook(sce)
    for step in range(2):
        online_before = [p.clone() for p in sce.trunk.parameters()]
        target_before = [p.clone() for p in sce.momentum_trunk.parameters()]
        loss, _ = sce(clips(seed=step))
        trainer.backward(loss)
        opt.param_groups[0]['lr'] = 0.1
        trainer.step([hook])
        m = momentum_value(step, 10, 0.99)  # the first update uses m0
        for o, t, t0 in zip(sce.trunk.parameters(), sce.momentum_trunk.parameters(), target_before):
            torch.testing.assert_close(t, m * t0 + (1 - m) * o)
        assert not all(torch.equal(a, b) for a, b in zip(online_before, sce.trunk.parameters()))
        assert sce.global_step == step + 1
    assert sce.queue_ptr.item() == 0  # 2 steps x 8 keys into 16 slots
    # the target's BN statistics come from its own forwards, not from the online ones
    running = {k: v for k, v in sce.momentum_trunk.state_dict().items() if 'running' in k}
    online = {k: v for k, v in sce.trunk.state_dict().items() if 'running' in k}
    assert any(not torch.equal(running[k], target_buffers[k]) for k in running)
    assert any(not torch.allclose(running[k], online[k]) for k in running)


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_loss_is_float32_with_autocast_off_inside_amp(monkeypatch, amp):
    import models.sce as sce_module
    torch.manual_seed(0)
    sce = tiny_sce()
    trainer = TrainStep(sce, build_lars(sce, lr=0.1), 'cpu', amp=amp)
    calls, predictions = [], []
    real_terms = sce_module._sce_terms

    def recording_terms(q, k, queue, coeff, temp, temp_m, k_global, *args):
        calls.append((q.dtype, k.dtype, queue.dtype, k_global.dtype, torch.is_autocast_enabled('cpu')))
        return real_terms(q, k, queue, coeff, temp, temp_m, k_global, *args)

    monkeypatch.setattr(sce_module, '_sce_terms', recording_terms)
    sce.predictor.register_forward_hook(lambda m, i, out: predictions.append(out.dtype))
    views = clips()
    with trainer.autocast():
        loss, _ = sce(views)
    assert predictions == [{'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]] * 2  # autocast was really on
    assert calls == [(torch.float32,) * 4 + (False,)] * 2 and loss.dtype == torch.float32
    trainer.backward(loss)
    trainer.step([SCEHook(sce)])
    assert int(trainer.skipped) == 0 and all(torch.isfinite(p).all() for p in sce.parameters())


def test_state_dict_holds_target_queue_and_pointer():
    sce = tiny_sce(num_classes=3)
    sce(clips())
    sce.enqueue_pending()
    state = sce.state_dict()
    assert {'queue', 'queue_ptr'} <= set(state) and any(k.startswith('momentum_trunk.') for k in state)
    assert any(k.startswith('momentum_projector.') for k in state)
    assert not any(k.startswith('momentum_predictor') for k in state)
    other = tiny_sce(num_classes=3)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.queue, sce.queue) and other.queue_ptr.item() == 8
    assert sce._ddp_params_and_buffers_to_ignore == ['online_evaluator.linear.weight', 'online_evaluator.linear.bias']


def test_full_r3d18_sce_step():
    torch.manual_seed(0)
    args = add_sce_model_args(argparse.ArgumentParser()).parse_args([])
    sce = build_sce(args, steps_per_epoch=10, epochs=2, num_classes=5)
    assert sce.queue.shape == (256, 32768)
    loss, logs = sce([torch.randn(4, 3, 4, 32, 32) for _ in range(2)], labels=torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and logs['coeff'] == 0.5 and logs['temp_m'] == 0.05


def test_flags_defaults_and_rejections():
    parser = add_sce_model_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.coeff, args.temp, args.temp_m, args.queue_size, args.initial_momentum) == (0.5, 0.1, 0.05, 32768, 0.99)
    assert args.sym and not args.use_keys and args.normalize_outputs and not args.mutual_pass
    assert (args.num_global_crops, args.num_local_crops, args.scheduler_coeff) == (2, 0, None)
    assert parser.parse_args(['--no-sym', '--scheduler_coeff', 'cosine']).sym is False
    for bad, match in ((['--shuffle_bn'], '--shuffle_bn'), (['--num_splits', '2'], '--num_splits'),
                       (['--coeff', '1.5'], '--coeff'), (['--temp_m', '0'], '--temp_m')):
        with pytest.raises(ValueError, match=match):
            check_sce_args(parser.parse_args(bad))
    with pytest.raises(ValueError, match='--queue_feature_dim'):
        build_sce(parser.parse_args(['--queue_feature_dim', '128']), trunk=TinyTrunk(512))
    with pytest.raises(SystemExit):
        parser.parse_args(['--scheduler_momentum', 'linear'])


# ------------------------------------------------------------------------------------------------ 2 processes

def _ddp_worker(rank, world, port, out_path):
    with gloo_group(rank, world, port):
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights and queue
        sce = tiny_sce(num_classes=3, queue_size=32)
        model = torch.nn.parallel.DistributedDataParallel(sce)
        opt = build_lars(model, lr=0.1)
        views = clips(batch=2, seed=10 + rank)
        targets = [t.clone() for t in sce._target(views)]
        loss, logs = model(views, labels=torch.tensor([0, 1]))
        loss.backward()
        opt.step()
        queue_before = sce.queue.clone()
        SCEHook(sce).after_step(type('T', (), {'num_updates': 1})())
        torch.save({'targets': targets, 'queue': sce.queue, 'queue_before': queue_before,
                    'ptr': sce.queue_ptr.item(), 'eval_w': sce.online_evaluator.linear.weight.detach(),
                    'trunk': [p.detach() for p in sce.trunk.parameters()]}, f'{out_path}.{rank}')


def test_ddp_queue_receives_both_ranks_keys_in_rank_order(tmp_path):
    out = str(tmp_path / 'rank')
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f'{out}.0'), torch.load(f'{out}.1')
    expected = torch.cat([r0['targets'][0], r1['targets'][0], r0['targets'][1], r1['targets'][1]]).T
    for r in (r0, r1):
        torch.testing.assert_close(r['queue'][:, :8], expected)
        torch.testing.assert_close(r['queue'][:, 8:], r0['queue_before'][:, 8:])
        assert r['ptr'] == 8
    torch.testing.assert_close(r0['eval_w'], r1['eval_w'])  # evaluator: synced init, averaged gradients
    for a, b in zip(r0['trunk'], r1['trunk']):
        torch.testing.assert_close(a, b)


def test_a_float64_model_keeps_float64_through_the_loss_and_the_queue():
    torch.manual_seed(0)
    sce = tiny_sce(num_classes=3).double()
    views = [v.double() for v in clips()]
    loss, logs = sce(views, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float64 and sce.queue.dtype == torch.float64
    assert sce._pending_keys[0].dtype == torch.float64
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in sce.parameters() if p.grad is not None)
