"""engine.py's contract with the methods that plug into it: the mask ratio reaches the model, the schedule's
metrics reach the log, micro-batch hooks see every batch, TensorBoard gets MAE's x axis, and a loop stopped by an
error ends the loader's workers."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine import masked_modeling_loss, train_one_epoch
from util.lr_sched import WarmupCosine
from util.train_step import TrainStep


class RecordingMIM(nn.Module):
    """A masked-image model stand-in: records the mask ratio it is called with and returns a loss and a log."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.ratios = []

    def forward(self, imgs, mask_ratio=0.75):
        self.ratios.append(mask_ratio)
        return (self.weight * imgs).square().mean(), {'visible': 1 - mask_ratio}


class FrozenDepthSchedule(WarmupCosine):
    def metrics(self):
        return {'frozen_depth': 3.0}


class RecordingHook:
    def __init__(self):
        self.micro_batches = []

    def after_step(self, trainer):
        pass

    def after_micro_batch(self, trainer, stepped):
        self.micro_batches.append((trainer.num_updates, stepped))


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, x):
        self.scalars.append((tag, x))


def epoch(model, batches=4, accum_iter=2, **kwargs):
    loader = DataLoader(TensorDataset(torch.randn(batches * 2, 3), torch.zeros(batches * 2)), batch_size=2)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu', accum_iter=accum_iter)
    schedule = kwargs.pop('schedule', WarmupCosine(0.1, 0.0, 2, 0))
    return train_one_epoch(loader, trainer, 1, schedule, masked_modeling_loss(0.4), **kwargs)


def test_the_mask_ratio_and_the_schedules_metrics_reach_the_model_and_the_log():
    model = RecordingMIM()
    stats = epoch(model, schedule=FrozenDepthSchedule(0.1, 0.0, 2, 0))
    assert model.ratios == [0.4] * 4
    assert stats['frozen_depth'] == 3.0 and stats['visible'] == pytest.approx(0.6)


def test_micro_batch_hooks_see_every_batch_after_its_step():
    hook = RecordingHook()
    epoch(RecordingMIM(), hooks=[hook])
    assert hook.micro_batches == [(0, False), (1, True), (1, False), (2, True)]


def test_tensorboard_gets_every_metric_at_epoch_1000x():
    writer = RecordingWriter()
    epoch(RecordingMIM(), log_writer=writer, print_freq=2)
    tags = {tag for tag, _ in writer.scalars}
    assert {'train_loss', 'lr', 'train/grad_norm', 'train/visible', 'perf/images_per_s',
            'perf/seconds_per_step'} <= tags
    # printed at the 2nd and the 4th of 4 steps of epoch 1: x = (step index / 4 + 1) * 1000, as MAE's data_iter_step
    assert sorted({x for tag, x in writer.scalars if tag == 'train_loss'}) == [1250, 1750]
    assert all(x is not None for _, x in writer.scalars)


class FailingLoader(DataLoader):
    """A loader whose iterator records that the engine shut its workers down."""

    def __iter__(self):
        batches = super().__iter__()
        self.shut = []
        batches._shutdown_workers = lambda: self.shut.append(True)
        return batches


def test_an_error_inside_the_epoch_ends_the_loaders_workers():
    model = RecordingMIM()
    loader = FailingLoader(TensorDataset(torch.randn(4, 3), torch.zeros(4)), batch_size=2)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu')

    def failing_loss(model, samples, targets):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_one_epoch(loader, trainer, 0, WarmupCosine(0.1, 0.0, 2, 0), failing_loss)
    assert loader.shut == [True]
