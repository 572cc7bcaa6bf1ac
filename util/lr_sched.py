"""Per-iteration learning rate: linear warmup from 0, then half-cycle cosine down to min_lr.

`WarmupCosine` is MAE's (a function of the fractional epoch); `cosine_scheduler` + `IterationSchedule` are
ConvNeXt's/SLaK's precomputed per-step arrays of lr and weight decay."""
import math

import numpy as np


def cosine_lr(epoch, base_lr, min_lr, warmup_epochs, epochs):
    """lr at a fractional epoch (step / steps_per_epoch + epoch)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupCosine:
    """MAE's schedule as the engine uses it: `adjust(optimizer, epoch)` at each window start sets every group's lr
    to cosine_lr(epoch) times the group's `lr_scale` (default 1)."""

    def __init__(self, lr, min_lr, epochs, warmup_epochs):
        self.lr, self.min_lr, self.epochs, self.warmup_epochs = lr, min_lr, epochs, warmup_epochs

    def adjust(self, optimizer, epoch):
        lr = cosine_lr(epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        return lr

    def metrics(self):
        return {}


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0,
                     warmup_steps=-1):
    """One value per optimizer step, as ConvNeXt's/SLaK's utils.cosine_scheduler: a linspace
    from start_warmup_value to base_value over the warmup (warmup_steps if > 0, else warmup_epochs epochs; its
    last value is base_value), then final + (base - final)(1 + cos(pi i / M)) / 2 for i = 0..M-1."""
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    if warmup_iters > total:
        raise ValueError(f'the warmup ({warmup_iters} steps) is longer than training ({total} steps): '
                         'lower --warmup_epochs / --warmup_steps')
    i = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate([np.linspace(start_warmup_value, base_value, warmup_iters), cosine])


class IterationSchedule:
    """The engine's schedule from per-optimizer-step arrays of lr and weight decay. At each accumulation window
    `adjust(optimizer, epoch + batch / batches_per_epoch)` sets every group's lr to lr[it] times its `lr_scale`
    and the weight decay of groups that have some to wd[it], it = epoch * steps_per_epoch + batch // accum_iter,
    or it = steps_done() (the optimizer steps taken, as a scheduler stepped after each optimizer step counts
    them) when given: the two differ once epochs end on a partial window that steps (the engine's 'step')."""

    def __init__(self, lr_values, wd_values, batches_per_epoch, accum_iter=1, steps_done=None):
        self.lr_values, self.wd_values = lr_values, wd_values
        self.batches, self.accum_iter = batches_per_epoch, accum_iter
        self.steps_done = steps_done
        self.steps_per_epoch = batches_per_epoch // accum_iter
        self.wd = float(wd_values[0])

    def index(self, epoch_float):
        if self.steps_done is not None:
            return min(self.steps_done(), len(self.lr_values) - 1)
        epoch = int(epoch_float)
        batch = round((epoch_float - epoch) * self.batches)
        # the unfinished window at an epoch's end never steps; clamp it into the array
        return min(epoch * self.steps_per_epoch + batch // self.accum_iter, len(self.lr_values) - 1)

    def adjust(self, optimizer, epoch_float):
        it = self.index(epoch_float)
        lr, self.wd = float(self.lr_values[it]), float(self.wd_values[it])
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
            if group['weight_decay'] > 0:
                group['weight_decay'] = self.wd
        return lr

    def metrics(self):
        return {'weight_decay': self.wd}
