"""SCE under gradient accumulation: the target's update rules (ours per step, eztorch's per micro-batch), the
partial window at an epoch's end, and accumulation against the whole batch."""
import copy
import math

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from engine import train_one_epoch
from test_sce_model import tiny_sce
from util.lr_sched import IterationSchedule
from util.sce.hooks import SCEHook
from util.sce.optim import build_lars
from util.train_step import TrainStep


def batches(n, batch, seed=0):
    """`n` loader batches of `batch` two-view clips ([B, 2, C, T, H, W], labels), float64."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 2, 3, 2, 8, 8, generator=g, dtype=torch.float64), torch.zeros(batch, dtype=torch.long))
            for _ in range(n)]


def two_views(model, samples, labels):
    return model([samples[:, 0], samples[:, 1]])


def bn_in_eval(model, samples, labels):
    """SCE with every BatchNorm on its running statistics, so a batch's loss is the mean of its samples' losses."""
    model.apply(lambda m: m.eval() if isinstance(m, _BatchNorm) else None)
    return two_views(model, samples, labels)


def train(sce, loader, accum_iter, teacher_update, compute_loss=two_views, lr=0.5, epochs=1):
    trainer = TrainStep(sce, build_lars(sce, lr=lr), 'cpu', accum_iter=accum_iter)
    steps = math.ceil(len(loader) / accum_iter) * epochs
    schedule = IterationSchedule(np.full(steps, lr), np.zeros(steps), len(loader), accum_iter,
                                 steps_done=lambda: trainer.num_updates)
    hook = SCEHook(sce, teacher_update)
    for epoch in range(epochs):
        sce.epoch = epoch
        train_one_epoch(loader, trainer, epoch, schedule, compute_loss, [hook], print_freq=1000,
                        partial_window='step')
    return trainer


def record_momenta(monkeypatch, sce):
    """The momentum of every target update, in order."""
    momenta, update = [], sce.momentum_update
    monkeypatch.setattr(sce, 'momentum_update', lambda m: (momenta.append(m), update(m)))
    return momenta


def eztorch_momenta(micro_batches, accum_iter, horizon_steps, initial):
    """eztorch's momentum_base.py under Lightning's accumulate_grad_batches, by hand: after every micro-batch
    (on_train_batch_end, after the optimizer step when the window ends, the last micro-batch of an epoch always
    stepping) the target moves with `current`, then current = cosine(global_step / (horizon_steps - 1))."""
    current, global_step, used = initial, 0, []
    for j in range(micro_batches):
        if (j + 1) % accum_iter == 0 or j + 1 == micro_batches:
            global_step += 1
        used.append(current)
        current = 1 - (1 - initial) * (math.cos(math.pi * global_step / (horizon_steps - 1)) + 1) / 2
    return used


@pytest.mark.parametrize('teacher_update', ['step', 'micro_batch'])
def test_target_updates_follow_each_rule_over_an_epoch_with_a_partial_window(monkeypatch, teacher_update):
    torch.manual_seed(0)
    micro_batches, accum = 5, 2  # windows of 2, 2 and 1 micro-batches: the last steps on its partial window
    # micro_batch: eztorch's horizon counts loader batches per epoch (5 x 2 epochs); step: ours, optimizer steps
    horizon = micro_batches * 2 if teacher_update == 'micro_batch' else 2 * 2
    sce = tiny_sce(steps_per_epoch=horizon // 2, epochs=2, initial_momentum=0.9).double()
    momenta = record_momenta(monkeypatch, sce)
    trainer = train(sce, batches(micro_batches, 2), accum, teacher_update)
    assert trainer.num_updates == 3 and sce.global_step == 3
    if teacher_update == 'micro_batch':
        expected = eztorch_momenta(micro_batches, accum, horizon, 0.9)
    else:  # one update per optimizer step s, with m(s) over the optimizer-step horizon
        expected = [1 - 0.1 * (math.cos(math.pi * s / (horizon - 1)) + 1) / 2 for s in range(3)]
    assert momenta == pytest.approx(expected, abs=1e-15)
    assert len(set(momenta)) == 3  # three different momenta: the position moved with every optimizer step


def test_micro_batch_updates_see_the_student_before_its_step(monkeypatch):
    """In a window of two micro-batches the first target update uses the student before the optimizer step and
    the second the stepped student: the target ends at m^2 t + m(1 - m) w0 + (1 - m) w1."""
    torch.manual_seed(0)
    sce = tiny_sce(steps_per_epoch=4, epochs=1, scheduler_momentum='constant', initial_momentum=0.8).double()
    w0 = [p.detach().clone() for p in sce.trunk.parameters()]
    t0 = [p.detach().clone() for p in sce.momentum_trunk.parameters()]
    train(sce, batches(2, 2), 2, 'micro_batch')
    m = 0.8
    for t, a, b, after in zip(t0, w0, sce.trunk.parameters(), sce.momentum_trunk.parameters()):
        torch.testing.assert_close(after, m * m * t + m * (1 - m) * a + (1 - m) * b, rtol=0, atol=1e-14)
    assert not all(torch.equal(a, b) for a, b in zip(w0, sce.trunk.parameters()))


def test_step_mode_with_accumulation_equals_the_whole_batch():
    """Accumulating 2 micro-batches of 2 gives the student, target and queue of batch 4 without accumulation
    (BatchNorm on running statistics, so the batch split cannot matter): the teacher moves once per step."""
    whole = batches(3, 4)
    halves = [(x[i:i + 2], y[i:i + 2]) for x, y in whole for i in (0, 2)]
    torch.manual_seed(0)
    a = tiny_sce(steps_per_epoch=3, epochs=1, queue_size=32).double()
    b = tiny_sce(steps_per_epoch=3, epochs=1, queue_size=32).double()
    b.load_state_dict(a.state_dict())
    train(a, whole, 1, 'step', bn_in_eval)
    train(b, halves, 2, 'step', bn_in_eval)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name != 'queue':
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=name)
    assert int(a.queue_ptr) == int(b.queue_ptr) == 3 * 2 * 4
    # the same keys in the queue, in another order: a window enqueues its micro-batches one after the other (view
    # 0 then view 1 of each), the whole batch view 0 of its four clips, then view 1
    columns = [8 * s + 4 * v + 2 * h + i for s in range(3) for h in (0, 1) for v in (0, 1) for i in (0, 1)]
    torch.testing.assert_close(b.queue[:, :24], a.queue[:, columns], rtol=0, atol=1e-12)
    torch.testing.assert_close(a.queue[:, 24:], b.queue[:, 24:], rtol=0, atol=0)


def test_an_epoch_ends_by_stepping_on_its_partial_window_with_the_loss_divided_by_the_window(monkeypatch):
    """3 micro-batches with accumulation 2: the third steps alone (Lightning's rule, not dropped), on the gradient
    of its loss divided by 2."""
    torch.manual_seed(0)
    sce = tiny_sce(steps_per_epoch=2, epochs=1).double()
    data, seen, grads = batches(3, 2), [], []

    def loss(model, samples, labels):
        seen.append(copy.deepcopy(model))  # the model as this micro-batch's forward finds it
        return bn_in_eval(model, samples, labels)

    def step(self, hooks=(), _step=TrainStep.step):
        grads.append([p.grad.clone() for p in sce.trunk.parameters()])
        return _step(self, hooks)
    monkeypatch.setattr(TrainStep, 'step', step)
    trainer = train(sce, data, 2, 'step', loss)
    assert trainer.num_updates == 2 and len(grads) == 2
    alone = seen[2]
    bn_in_eval(alone, *data[2])[0].backward()
    for got, p in zip(grads[1], alone.trunk.parameters()):
        torch.testing.assert_close(got, p.grad / 2, rtol=1e-12, atol=1e-15)


def test_warmups_end_with_their_epoch_as_eztorchs():
    """eztorch switches coeff and temp_m to their final values when current_epoch reaches the warmup, whatever
    global_step says: under accumulation its horizons count micro-batches, so the step has not got there yet."""
    sce = tiny_sce(steps_per_epoch=10, epochs=3, warmup_epoch_coeff=1, start_warmup_coeff=1.0, coeff=0.5,
                   warmup_epoch_temp_m=1, start_warmup_temp_m=0.1, temp_m=0.05, warmup_scheduler_temp_m='linear')
    sce.global_step = 5  # 5 optimizer steps = 10 micro-batches with accumulation 2: epoch 1 has begun
    sce.epoch = 0
    assert sce.current_coeff() == pytest.approx(1.0 - 0.5 * 5 / 9)
    assert sce.current_temp_m() == pytest.approx(0.1 - 0.05 * 5 / 9)
    sce.epoch = 1
    assert (sce.current_coeff(), sce.current_temp_m()) == (0.5, 0.05)
    sce.epoch = None  # no loop epoch: the step's (global_step // steps_per_epoch)
    assert sce.current_coeff() == pytest.approx(1.0 - 0.5 * 5 / 9)


def test_lr_follows_the_optimizer_steps_taken_across_partial_windows(monkeypatch):
    """5 micro-batches per epoch with accumulation 2 take 3 steps; the next epoch's first step is step 3 of the
    schedule (a per-step scheduler, as Lightning's), not 2 (epoch x full windows)."""
    torch.manual_seed(0)
    sce = tiny_sce(steps_per_epoch=2, epochs=2).double()
    lrs, values = [], np.arange(1, 7) / 10
    monkeypatch.setattr(TrainStep, 'step', lambda self, hooks=(), _step=TrainStep.step: (
        lrs.append(self.optimizer.param_groups[0]['lr']), _step(self, hooks))[1])
    trainer = TrainStep(sce, build_lars(sce, lr=1.0), 'cpu', accum_iter=2)
    schedule = IterationSchedule(values, np.zeros(6), 5, 2, steps_done=lambda: trainer.num_updates)
    for epoch in range(2):
        train_one_epoch(batches(5, 2), trainer, epoch, schedule, two_views, [SCEHook(sce)], print_freq=1000,
                        partial_window='step')
    assert lrs == pytest.approx(list(values))
