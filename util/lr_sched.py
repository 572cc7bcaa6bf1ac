"""Per-iteration learning rate: linear warmup from 0, then half-cycle cosine down to min_lr."""
import math


def cosine_lr(epoch, base_lr, min_lr, warmup_epochs, epochs):
    """lr at a fractional epoch (step / steps_per_epoch + epoch)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch, args):
    """Sets every group's lr to the schedule's value times the group's `lr_scale` (default 1)."""
    lr = cosine_lr(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr


class WarmupCosine:
    """The baseline schedule as the engine uses it: `adjust(optimizer, epoch)` at each window start."""

    def __init__(self, args):
        self.args = args

    def adjust(self, optimizer, epoch):
        return adjust_learning_rate(optimizer, epoch, self.args)

    def metrics(self):
        return {}
