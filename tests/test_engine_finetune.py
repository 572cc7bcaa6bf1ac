"""Fine-tuning engine: evaluation counts each sample once under DDP, training learns, EMA follows timm's formula."""
import argparse

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, TensorDataset

from engine import train_one_epoch
from engine_finetune import classification_loss, evaluate
from helpers import GradRecorder, free_port, gloo_group
from util.data.samplers import UnpaddedDistributedSampler, build_eval_loader
from util.hooks import ModelEmaHook
from util.lr_sched import WarmupCosine
from util.train_step import TrainStep

NUM_EVAL, EVAL_CLASSES = 13, 6
CORRECT1 = [i for i in range(NUM_EVAL) if i % 3]                 # 8 of 13 right at top-1
MISS5 = [i for i in range(NUM_EVAL) if i % 3 == 0 and i % 2 == 0]  # 0, 6, 12: target ranked last


def eval_data():
    """Logits of an identity classifier are the inputs: class i % 6 scores 10, the others 0.1 * class index.
    Wrong targets are either the lowest-scored class (a top-5 miss) or another one (a top-5 hit)."""
    x = torch.arange(EVAL_CLASSES, dtype=torch.float32).repeat(NUM_EVAL, 1) * 0.1
    top = torch.arange(NUM_EVAL) % EVAL_CLASSES
    x[torch.arange(NUM_EVAL), top] = 10.0
    lowest = torch.where(top == 0, 1, 0)
    y = top.clone()
    for i in range(NUM_EVAL):
        if i not in CORRECT1:
            y[i] = lowest[i] if i in MISS5 else (top[i] + 1) % EVAL_CLASSES
    return TensorDataset(x, y)


def identity_classifier():
    model = torch.nn.Linear(EVAL_CLASSES, EVAL_CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.eye(EVAL_CLASSES))
        model.bias.zero_()
    return model


def test_unpadded_sampler_partitions_without_duplicates():
    shards = [list(UnpaddedDistributedSampler(range(13), num_replicas=3, rank=r)) for r in range(3)]
    assert shards[0] == [0, 3, 6, 9, 12] and [len(s) for s in shards] == [5, 4, 4]
    assert sorted(sum(shards, [])) == list(range(13))
    UnpaddedDistributedSampler(range(13), 3, 1).set_epoch(5)  # a no-op, for the entry scripts' loop
    with pytest.raises(ValueError, match='rank 3'):
        UnpaddedDistributedSampler(range(13), 3, 3)


def test_evaluate_single_process_matches_hand_computation():
    data = eval_data()
    model = identity_classifier().train()
    stats = evaluate(build_eval_loader(data, 4, 0, False, dist_eval=True), model, 'cpu')
    assert model.training  # the previous mode is restored
    assert stats['count'] == NUM_EVAL
    assert stats['acc1'] == 100 * 8 / 13
    assert stats['acc5'] == 100 * 10 / 13
    x, y = data.tensors
    assert stats['loss'] == pytest.approx(F.cross_entropy(x, y).item(), abs=1e-6)
    # fewer than 5 classes: top-5 is every class
    few = TensorDataset(x[:, :3], y.clamp(max=2))
    assert evaluate(DataLoader(few, batch_size=5), torch.nn.Identity(), 'cpu')['acc5'] == 100.0


def _eval_worker(rank, world, port, out_path):
    with gloo_group(rank, world, port):
        model = torch.nn.parallel.DistributedDataParallel(identity_classifier())  # evaluate unwraps it
        # batch 3: rank 0 holds 7 samples (3 batches), rank 1 holds 6 (2 batches)
        sharded = evaluate(build_eval_loader(eval_data(), 3, 0, False, dist_eval=True), model, 'cpu')
        whole = evaluate(build_eval_loader(eval_data(), 3, 0, False, dist_eval=False), model, 'cpu')
        torch.save({'sharded': sharded, 'whole': whole}, f'{out_path}.{rank}')


def test_dist_eval_counts_each_sample_once_and_matches_one_process(tmp_path):
    out = str(tmp_path / 'eval')
    mp.spawn(_eval_worker, args=(2, free_port(), out), nprocs=2, join=True)
    single = evaluate(build_eval_loader(eval_data(), 3, 0, False, dist_eval=True), identity_classifier(), 'cpu')
    for rank in range(2):
        result = torch.load(f'{out}.{rank}')
        for mode in ('sharded', 'whole'):  # with dist_eval the shards are summed; without, nothing is
            stats = result[mode]
            assert stats['count'] == NUM_EVAL
            assert (stats['acc1'], stats['acc5']) == (single['acc1'], single['acc5'])
            assert stats['loss'] == pytest.approx(single['loss'], abs=1e-6)


def blobs(n=256, seed=0):
    """Four Gaussian blobs at the corners of a square, one per class: separable by a small MLP."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centers = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])
    return TensorDataset(centers[y] + 0.5 * torch.randn(n, 2, generator=g), y)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def fit_args(**kw):
    base = dict(batch_size=16, accum_iter=1, lr=1e-2, min_lr=1e-4, warmup_epochs=1, epochs=4, print_freq=100)
    base.update(kw)
    return argparse.Namespace(**base)


def fit(model, criterion, args, mixup_fn=None, hooks=()):
    train, val = blobs(seed=0), blobs(128, seed=1)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    trainer = TrainStep(model, opt, 'cpu', accum_iter=args.accum_iter)
    val_loader = build_eval_loader(val, 64, 0, False, dist_eval=False)
    before = evaluate(val_loader, model, 'cpu')
    schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
    losses = [train_one_epoch(loader, trainer, epoch, schedule, classification_loss(criterion, 'cpu', mixup_fn),
                              hooks, print_freq=args.print_freq)['loss'] for epoch in range(args.epochs)]
    return before, evaluate(val_loader, model, 'cpu'), losses, trainer


def test_training_with_label_smoothing_learns_the_blobs():
    torch.manual_seed(0)
    before, after, losses, _ = fit(mlp(), LabelSmoothingCrossEntropy(0.1), fit_args(accum_iter=2))
    assert before['acc1'] < 60
    assert after['acc1'] > 90 and after['count'] == 128
    assert losses[-1] < losses[0]


def test_training_with_mixup_and_soft_targets_runs_and_loss_decreases():
    torch.manual_seed(0)
    np.random.seed(0)  # Mixup draws lambda from numpy
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=4)
    _, after, losses, _ = fit(mlp(), SoftTargetCrossEntropy(), fit_args(), mixup_fn=mixup)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert after['acc1'] > 80


class Recorder:
    """A hook that keeps a copy of the weights after every optimizer step."""

    def __init__(self, model):
        self.model, self.weights = model, []

    def after_step(self, trainer):
        self.weights.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_model_ema_hook_follows_the_closed_formula(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    d = 0.9
    ema, recorder = ModelEmaHook(model, decay=d), Recorder(model)
    args = fit_args(batch_size=64, epochs=1, warmup_epochs=0)  # 4 optimizer steps
    _, _, _, trainer = fit(model, torch.nn.CrossEntropyLoss(), args, hooks=(recorder, ema))
    assert trainer.num_updates == len(recorder.weights) == 4
    # timm with step=num_updates: the first update copies the weights, then ema = d * ema + (1 - d) * w
    expected = recorder.weights[0]
    for w in recorder.weights[1:]:
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    current = model.state_dict()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(v, current[k]) and not torch.allclose(v, w0[k])
    assert not ema.module.training

    # checkpoints: plain model keys, loadable with weights_only=True
    torch.save({'model_ema': ema.state_dict()}, tmp_path / 'ckpt.pth')
    restored = ModelEmaHook(mlp(), decay=d)
    restored.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True)['model_ema'])
    for k, v in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)
    mlp().load_state_dict(ema.state_dict())


def test_accumulated_classification_gradient_is_the_large_batch_gradient():
    """Plain SGD, so the gradient's scale reaches the weights: 2 micro-batches of 8 == one batch of 16 ==
    the gradient of the mean cross-entropy over the 16 samples, computed here by hand."""
    data = blobs(16, seed=3)
    torch.manual_seed(0)
    w0 = {k: v.clone() for k, v in mlp().state_dict().items()}
    reference = mlp()
    reference.load_state_dict(w0)
    F.cross_entropy(reference(data.tensors[0]), data.tensors[1]).backward()
    expected = [p.grad for p in reference.parameters()]
    lr = 0.5
    for batch_size, accum_iter in ((16, 1), (8, 2), (4, 4)):
        model = mlp()
        model.load_state_dict(w0)
        recorder = GradRecorder(model)
        trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=lr), 'cpu', accum_iter=accum_iter)
        args = fit_args(batch_size=batch_size, accum_iter=accum_iter, lr=lr, min_lr=lr, warmup_epochs=0, epochs=1)
        schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
        train_one_epoch(DataLoader(data, batch_size=batch_size), trainer, 0, schedule,
                        classification_loss(torch.nn.CrossEntropyLoss(), 'cpu'),
                        hooks=[recorder], print_freq=args.print_freq)
        assert trainer.num_updates == len(recorder.grads) == 1
        for (name, p), g, e in zip(model.named_parameters(), recorder.grads[0], expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p.detach(), w0[name] - lr * e, rtol=1e-5, atol=1e-7)
