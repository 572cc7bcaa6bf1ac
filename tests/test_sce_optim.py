"""SCE optimisation (util/sce/optim.py, util/lars.py): LARS against its formula, parameter groups, LR scaling and the
per-step linear-warmup + cosine schedule."""
import numpy as np
import pytest
import timm.optim
import torch
from torch import nn

from util.lars import LARS
from util.sce.optim import (build_lars, scale_learning_rate, sce_lr_values, sce_param_groups, sce_schedule,
                            warmup_cosine_lr)


def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.Flatten(), nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[4].weight.zero_()  # a zero-norm weight: trust ratio 1
    return net


def lars_reference(params, grads, mus, lr, wd, momentum, eta):
    """LARS by its formula in float64 NumPy: for ndim > 1, weight decay and the trust ratio eta |p| / |g + wd p|;
    then heavy-ball momentum."""
    new_params, new_mus = [], []
    for p, g, mu in zip(params, grads, mus):
        d = g.copy()
        if p.ndim > 1:
            d = g + wd * p
            pn, dn = np.linalg.norm(p), np.linalg.norm(d)
            d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
        mu = momentum * mu + d
        new_params.append(p - lr * mu)
        new_mus.append(mu)
    return new_params, new_mus


def test_lars_matches_formula():
    net = small_net().double()
    opt = LARS(net.parameters(), lr=0.0, weight_decay=0.01, momentum=0.9, trust_coefficient=1e-3)
    params = [p.detach().numpy().copy() for p in net.parameters()]
    mus = [np.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(1)
    for step, lr in enumerate([0.0, 0.5, 4.8, 1.0]):  # lr 0 first: only the momentum fills
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        grads = [p.grad.numpy().copy() for p in net.parameters()]
        opt.param_groups[0]['lr'] = lr
        opt.step()
        params, mus = lars_reference(params, grads, mus, lr, 0.01, 0.9, 1e-3)
        for p, ref, mu in zip(net.parameters(), params, mus):
            np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(opt.state[p]['mu'].numpy(), mu, rtol=1e-12, atol=1e-15)
        if step == 0:
            assert all(np.array_equal(p.detach().numpy(), r) for p, r in zip(net.parameters(), params))


def test_timm_lars_differs_from_ours():
    """Why util/lars.py exists: timm's trust ratio is eta |p| / (|g| + wd |p|), not eta |p| / |g + wd p|."""
    ours, theirs = small_net(), small_net()
    opt_ours = LARS(ours.parameters(), lr=1.0, weight_decay=0.1, momentum=0.9)
    opt_timm = timm.optim.Lars(theirs.parameters(), lr=1.0, weight_decay=0.1, momentum=0.9, trust_coeff=1e-3)
    for net in (ours, theirs):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
    opt_ours.step()
    opt_timm.step()
    assert not torch.allclose(ours[0].weight, theirs[0].weight)


class Fake(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv3d(3, 4, 1, bias=True), nn.BatchNorm3d(4))
        self.projector = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4))
        self.predictor = nn.Linear(4, 4, bias=False)
        self.momentum_trunk = nn.Conv3d(3, 4, 1)
        self.online_evaluator = nn.Linear(4, 2)


def test_param_groups():
    model = Fake()
    groups = sce_param_groups(model, 1e-6)
    assert len(groups) == 1 and groups[0]['weight_decay'] == 1e-6 and len(groups[0]['params']) == 8
    groups = sce_param_groups(model, 1e-6, exclude_bias=True, exclude_norm=True)
    assert [len(g['params']) for g in groups] == [3, 5] and groups[1]['weight_decay'] == 0.0
    groups = sce_param_groups(model, 1e-6, exclude_bias=True)
    assert [len(g['params']) for g in groups] == [5, 3]  # BN biases are named 'bias' too
    opt = build_lars(model, lr=4.8)
    assert isinstance(opt, LARS) and opt.defaults['trust_coefficient'] == 1e-3 and opt.defaults['momentum'] == 0.9


def test_lr_scaling():
    assert scale_learning_rate(2.4, 512) == pytest.approx(4.8)
    assert scale_learning_rate(2.4, 16, 'sqrt') == pytest.approx(9.6)
    assert scale_learning_rate(2.4, 512, 'none') == 2.4
    with pytest.raises(ValueError, match='--lr_scaler'):
        scale_learning_rate(2.4, 512, 'cubic')


def test_schedule_closed_form():
    base, W, M = 4.8, 5, 20
    lrs = sce_lr_values(base, epochs=20, warmup_epochs=5, steps_per_epoch=1)
    assert len(lrs) == M and lrs[0] == 0.0 and lrs[W - 1] == pytest.approx(base) and lrs[W] == pytest.approx(base)
    for s in range(M):
        expected = s * base / (W - 1) if s < W else 0.5 * base * (1 + np.cos(np.pi * (s - W) / (M - W)))
        assert lrs[s] == pytest.approx(expected)
    assert warmup_cosine_lr(1, 4.8, 35 * 156, 200 * 156) == pytest.approx(8.79e-4, rel=1e-3)  # 4.8 / (35 * 156 - 1)


def test_schedule_object_per_optimizer_step_with_accumulation():
    sched = sce_schedule(4.8, 1e-6, epochs=4, warmup_epochs=1, steps_per_epoch=3, accum_iter=2)
    opt = build_lars(Fake(), lr=0.0, weight_decay=1e-6)
    lrs = sce_lr_values(4.8, 4, 1, 3)
    seen = []
    for epoch in range(4):
        for batch in range(0, 6, 2):  # the engine adjusts at each accumulation window's start
            seen.append(sched.adjust(opt, epoch + batch / 6))
            assert opt.param_groups[0]['lr'] == seen[-1] and opt.param_groups[0]['weight_decay'] == 1e-6
    np.testing.assert_allclose(seen, lrs)
    assert sched.metrics() == {'weight_decay': 1e-6}
