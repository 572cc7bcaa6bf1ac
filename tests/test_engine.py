"""engine.py's loop and the LR schedule: accumulation, non-finite steps, and DDP against one process."""
import math

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from engine import masked_modeling_loss, train_one_epoch
from helpers import (GradRecorder, LinearRegression, MIMWithPerSampleMask, assert_same_grads, engine_args, free_port,
                     gloo_group, image_data)
from util.lr_sched import WarmupCosine, cosine_lr
from util.train_step import NonFiniteLossError, TrainStep


def closed_form_lr(t, base, min_lr, warmup, epochs):
    if t < warmup:
        return base * t / warmup
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup))) / 2


def test_lr_schedule_matches_formula_and_worked_values():
    for t in [0, 0.25, 1, 3.5, 7.2, 10]:
        assert cosine_lr(t, 1e-3, 1e-6, 2, 10) == pytest.approx(closed_form_lr(t, 1e-3, 1e-6, 2, 10), abs=1e-15)
    # worked by hand: base 1e-3, warmup 1, epochs 3, min 1e-6
    assert cosine_lr(0.5, 1e-3, 1e-6, 1, 3) == pytest.approx(5e-4)
    assert cosine_lr(1, 1e-3, 1e-6, 1, 3) == pytest.approx(1e-3)
    assert cosine_lr(2, 1e-3, 1e-6, 1, 3) == pytest.approx(5.005e-4)
    assert cosine_lr(0, 1e-3, 1e-6, 1, 3) == 0.0


def test_warmup_cosine_applies_group_scales():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{'params': [p1], 'lr_scale': 0.1}, {'params': [p2]}], lr=1.0)
    lr = WarmupCosine(lr=2e-3, min_lr=0.0, epochs=5, warmup_epochs=1).adjust(opt, 0.5)
    assert lr == pytest.approx(1e-3)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])


def regression_data(n=16):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.zeros(n))


def sgd(params, lr):
    """Plain SGD: the update is lr * gradient, so any error in the gradient's scale shows in the weights."""
    return torch.optim.SGD(params, lr=lr)


def run_epochs(model, dataset, args, world=1, rank=0, epochs=1, wrap=None, max_nonfinite=5, optimizer=None,
               hooks=()):
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = (optimizer or (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True)))(model.parameters(), args.lr)
    net = wrap(model) if wrap else model
    trainer = TrainStep(net, opt, 'cpu', 'none', args.accum_iter, max_nonfinite=max_nonfinite)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
        losses.append(train_one_epoch(loader, trainer, epoch, schedule, masked_modeling_loss(args.mask_ratio), hooks,
                                      print_freq=args.print_freq)['loss'])
    return losses, trainer


def test_accumulation_equals_large_batch():
    data = regression_data(8)
    torch.manual_seed(0)
    big = LinearRegression()
    small = LinearRegression()
    small.load_state_dict(big.state_dict())
    w0 = {k: v.clone() for k, v in big.state_dict().items()}
    # the reference gradient, by hand: the mean loss over the whole batch of 8
    reference = LinearRegression()
    reference.load_state_dict(w0)
    reference(data.tensors[0])[0].backward()
    expected = [p.grad for p in reference.parameters()]
    recorders = GradRecorder(big), GradRecorder(small)
    lr = 0.1
    run_epochs(big, data, engine_args(batch_size=8, accum_iter=1, lr=lr), optimizer=sgd, hooks=[recorders[0]])
    _, trainer = run_epochs(small, data, engine_args(batch_size=4, accum_iter=2, lr=lr), optimizer=sgd,
                            hooks=[recorders[1]])
    assert trainer.num_updates == 1
    for recorder in recorders:  # accumulated gradient of 2 x 4 samples == the gradient of the batch of 8
        assert len(recorder.grads) == 1
        for g, e in zip(recorder.grads[0], expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    for (name, a), b, e in zip(big.named_parameters(), small.parameters(), expected):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, w0[name] - lr * e, rtol=1e-5, atol=1e-7)  # SGD: w0 - lr * g
        assert (b - w0[name]).abs().max() > 1e-3  # it moved


class Exploding(LinearRegression):
    def forward(self, x, mask_ratio=None):
        loss, logs = super().forward(x)
        return loss * float('nan'), logs


def test_nonfinite_steps_are_skipped_then_stop():
    torch.manual_seed(0)
    model = Exploding()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match='non-finite for 2 optimizer steps in a row'):
        run_epochs(model, regression_data(16), engine_args(batch_size=8), max_nonfinite=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_isolated_nonfinite_step_is_skipped_and_training_continues():
    torch.manual_seed(0)
    model = LinearRegression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    trainer = TrainStep(model, opt, 'cpu', 'none', max_nonfinite=3)
    x = torch.randn(4, 6)
    w = model.fc.weight.detach().clone()
    trainer.backward(model(x)[0] * float('inf'))
    trainer.step()
    assert torch.equal(w, model.fc.weight) and int(trainer.skipped) == 1
    trainer.backward(model(x)[0])
    trainer.step()
    trainer.check()
    assert not torch.equal(w, model.fc.weight) and opt.state[model.fc.weight]['step'].item() == 1


DDP_LR = 0.05


def _ddp_worker(rank, world, port, state, out_path):
    with gloo_group(rank, world, port):
        model = MIMWithPerSampleMask()
        model.load_state_dict(state)
        recorder = GradRecorder(model)
        args = engine_args(batch_size=2, accum_iter=2, lr=DDP_LR)
        losses, _ = run_epochs(model, image_data(), args, world, rank, epochs=3,
                               wrap=torch.nn.parallel.DistributedDataParallel, optimizer=sgd, hooks=[recorder])
        torch.save({'losses': losses, 'state': model.state_dict(), 'grads': recorder.grads}, f'{out_path}.{rank}')


def test_ddp_two_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = MIMWithPerSampleMask()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / 'ddp.pt'
    mp.spawn(_ddp_worker, args=(2, free_port(), state, str(out)), nprocs=2, join=True)
    ddp = [torch.load(f'{out}.{rank}') for rank in range(2)]
    # one process, same global batch: 2 processes x batch 2 x accum 2 == 1 process x batch 4 x accum 2
    recorder = GradRecorder(model)
    single_losses, trainer = run_epochs(model, image_data(), engine_args(batch_size=4, accum_iter=2, lr=DDP_LR),
                                        epochs=3, optimizer=sgd, hooks=[recorder])
    assert trainer.num_updates == len(recorder.grads) == 6
    assert len(set(single_losses)) == 3  # the loss moves, so the comparison means something
    # after the all-reduce both ranks hold the same gradient: the mean over the global batch, as one process
    assert_same_grads(ddp[1]['grads'], ddp[0]['grads'], rtol=0, atol=0)
    assert_same_grads(ddp[0]['grads'], recorder.grads)
    assert ddp[0]['losses'] == pytest.approx(single_losses, rel=1e-5)
    moved = max((v - state[k]).abs().max().item() for k, v in model.state_dict().items())
    assert moved > 1e-2
    for k, v in model.state_dict().items():  # SGD: weight errors are lr times gradient errors
        torch.testing.assert_close(ddp[0]['state'][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['discard', 'skip', 'step'])
def test_an_unfinished_accumulation_window_ends_the_epoch_as_each_official_loop_ends_it(mode):
    """5 batches, accumulation 2: MAE's loop runs batch 5 and drops its gradient, ConvNeXt's and SLaK's never run it,
    Lightning's (SCE) steps on it with its loss still halved. BatchNorm statistics show which batches ran."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3) * (i + 1), torch.randint(0, 2, (4,))) for i in range(5)]

    def model_and_optimizer():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = model_and_optimizer()
    trainer = TrainStep(model, optimizer, 'cpu', accum_iter=2)
    loss = lambda net, x, y: torch.nn.functional.cross_entropy(net(x), y)  # noqa: E731
    train_one_epoch(batches, trainer, 0, WarmupCosine(0.1, 0.1, 1, 0), loss, print_freq=100, partial_window=mode)
    reference, ref_optimizer = model_and_optimizer()  # the official rules by hand
    for window in [batches[0:2], batches[2:4]] + ([batches[4:]] if mode == 'step' else []):
        for x, y in window:
            (loss(reference, x, y) / 2).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    if mode == 'discard':
        loss(reference, *batches[4]).backward()  # run, its gradient never used
    assert trainer.num_updates == (3 if mode == 'step' else 2)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="partial_window 'drop'"):
        train_one_epoch(batches, trainer, 1, WarmupCosine(0.1, 0.1, 1, 0), loss, partial_window='drop')
