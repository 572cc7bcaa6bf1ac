"""SCE's optimisation pieces around LARS: parameter selection, LR scaling and the
per-optimizer-step linear-warmup + cosine schedule.

- Parameters: the online trunk, projector and predictor only (the momentum target has requires_grad=False
  and the online linear evaluator has its own Adam). `exclude_norm` / `exclude_bias` move BN / LayerNorm
  parameters / parameters named `bias` into a group with weight decay 0. The reference run sets neither, and
  since LARS already skips weight decay for every 1-D parameter the flags change nothing for this model.
- LR scaling: linear lr = initial_lr * batch_size / 256 (2.4 * 512 / 256 = 4.8), sqrt, or none.
- Schedule (lightning-bolts' LinearWarmupCosineAnnealingLR stepped every optimizer step, closed form):
  lr(s) = ws + s (base - ws) / (W - 1) for s < W, then eta_min + (base - eta_min)(1 + cos(pi (s - W)/(M - W)))/2,
  so lr(0) = ws = 0 (the first step only fills LARS' momentum) and lr(W - 1) = lr(W) = base.
  W = warmup_epochs * steps_per_epoch, M = epochs * steps_per_epoch, steps_per_epoch = floor(rows / global batch).
"""
import math

import numpy as np
import torch.nn as nn

from util.dist import unwrap
from util.lars import LARS
from util.lr_sched import IterationSchedule

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def scale_learning_rate(initial_lr, batch_size, scaler='linear', multiply_lr=1.0):
    if scaler == 'linear':
        lr = initial_lr * batch_size / 256
    elif scaler == 'sqrt':
        lr = initial_lr * math.sqrt(batch_size)
    elif scaler in (None, 'none'):
        lr = initial_lr
    else:
        raise ValueError(f'--lr_scaler must be linear, sqrt or none, got {scaler!r}')
    return lr * multiply_lr


def learnable_modules(model):
    """The online modules the optimizer trains (unwraps DDP)."""
    model = unwrap(model)
    return [m for m in (model.trunk, model.projector, getattr(model, 'predictor', None)) if m is not None]


def sce_param_groups(model, weight_decay, exclude_bias=False, exclude_norm=False):
    decay, no_decay = [], []
    for module in learnable_modules(model):
        for mod_name, mod in module.named_modules():
            for name, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                excluded = (exclude_norm and isinstance(mod, NORM_TYPES)) or (exclude_bias and name == 'bias')
                (no_decay if excluded else decay).append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}]
    if no_decay:
        groups.append({'params': no_decay, 'weight_decay': 0.0})
    return groups


def build_lars(model, lr, weight_decay=1e-6, momentum=0.9, trust_coefficient=1e-3, exclude_bias=False,
               exclude_norm=False):
    """LARS over `sce_param_groups`; the schedule sets the lr every step (lr here is only the initial value)."""
    return LARS(sce_param_groups(model, weight_decay, exclude_bias, exclude_norm), lr=lr,
                weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)


def warmup_cosine_lr(step, base_lr, warmup_steps, total_steps, warmup_start_lr=0.0, eta_min=0.0):
    """The lr used at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return warmup_start_lr + step * (base_lr - warmup_start_lr) / max(1, warmup_steps - 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sce_lr_values(base_lr, epochs, warmup_epochs, steps_per_epoch, warmup_start_lr=0.0, eta_min=0.0):
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    if warmup > total:
        raise ValueError(f'the warmup ({warmup_epochs} epochs) is longer than training ({epochs} epochs)')
    return np.array([warmup_cosine_lr(s, base_lr, warmup, total, warmup_start_lr, eta_min) for s in range(total)])


def sce_schedule(base_lr, weight_decay, epochs, warmup_epochs, steps_per_epoch, batches_per_epoch=None,
                 accum_iter=1, warmup_start_lr=0.0, eta_min=0.0, steps_done=None):
    """The engine's schedule object (`adjust(optimizer, epoch_float) -> lr`, `metrics()`): lr[s] at optimizer
    step s = epoch * steps_per_epoch + batch // accum_iter. `batches_per_epoch` is the loader's length
    (default steps_per_epoch * accum_iter); `steps_done` (a callable), if given, indexes by the steps taken
    instead, as Lightning's per-step scheduler does. Weight decay is constant."""
    lr = sce_lr_values(base_lr, epochs, warmup_epochs, steps_per_epoch, warmup_start_lr, eta_min)
    batches = batches_per_epoch or steps_per_epoch * accum_iter
    return IterationSchedule(lr, np.full(len(lr), weight_decay), batches, accum_iter, steps_done)
