"""FreezeOut (Brock et al. 2017) for LocalMIM: freeze the encoder front to back as training goes on.

Unit i (0 = patch embedding + cls token, i = block i-1; each LocalMIM stage belongs to the block it
reads) stops training at t_i = scale(t_0 + (1 - t_0) i / L) of the post-warmup run, t_0 being the
pre-scaling value of the official code (cubic, t_0 = 0.8: the first unit freezes at 51.2%). The last
block has t = 1 and never freezes. Times are fractional epochs (epoch + step / len(loader)), the
engine's clock, so they follow the real loader length. During warmup every unit ramps to its own
peak; afterwards each unit follows its own cosine down to 0 at its freeze time (or, with
`layerwise=False`, the global schedule until an abrupt freeze). With t_0 = 1 every unit follows the
baseline's schedule exactly and nothing freezes.

A freeze takes the unit's parameters out of autograd (`requires_grad_(False)`) and out of the
optimizer (param groups and state), and raises `model.frozen_units`, which makes the model run the
prefix under no_grad and skip the stages of frozen blocks. `on_freeze` callbacks (e.g. re-wrapping
DDP so frozen parameters are neither bucketed nor all-reduced) run after each freeze. With `prune`
(--decoder_prune) the decoders of frozen stages (with their HOG heads) leave the model too.
"""
import torch.nn as nn

from util.lr_sched import cosine_lr

SCALE_FNS = {'linear': lambda x: x, 'squared': lambda x: x ** 2, 'cubic': lambda x: x ** 3}


class FreezeOutSchedule:
    def __init__(self, num_units, how_scale, t_0, epochs, warmup_epochs, base_lr, min_lr, scale_lr=False,
                 layerwise=True):
        if how_scale not in SCALE_FNS:
            raise ValueError(f'--how_scale must be one of {sorted(SCALE_FNS)}, got {how_scale!r}')
        if not 0 < t_0 <= 1:
            raise ValueError(f'--t_0 must be in (0, 1], got {t_0}')
        last = num_units - 1
        self.t = [1.0 if i == last else SCALE_FNS[how_scale](t_0 + (1 - t_0) * i / last) for i in range(num_units)]
        self.freeze_at = [warmup_epochs + t * (epochs - warmup_epochs) for t in self.t]
        self.epochs, self.warmup_epochs = epochs, warmup_epochs
        self.base_lr, self.min_lr = base_lr, min_lr
        self.scale_lr, self.layerwise = scale_lr, layerwise

    def peak_lr(self, unit):
        return self.base_lr / self.t[unit] if self.scale_lr else self.base_lr

    def lr(self, unit, epoch):
        """Learning rate of `unit` at fractional epoch `epoch`."""
        if self.t[unit] >= 1 or not self.layerwise:
            return cosine_lr(epoch, self.peak_lr(unit), self.min_lr, self.warmup_epochs, self.epochs)
        return cosine_lr(epoch, self.peak_lr(unit), 0.0, self.warmup_epochs, self.freeze_at[unit])

    def frozen_units(self, epoch):
        """How many leading units are frozen at `epoch` (t_i grows with i, so frozen units are a prefix)."""
        return sum(1 for t, at in zip(self.t, self.freeze_at) if t < 1 and epoch >= at)


def unit_parameters(model):
    """[[(name, param), ...] per unit] over the trainable parameters of a LocalMIM model."""
    units = [[] for _ in range(len(model.blocks) + 1)]
    stage_unit = {k: tap + 1 for k, tap in enumerate(model.ID)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head, _, rest = name.partition('.')
        index = rest.split('.')[0]
        if head in ('patch_embed', 'cls_token'):
            units[0].append((name, p))
        elif head == 'blocks':
            units[int(index) + 1].append((name, p))
        elif head in ('norm', 'decoder'):
            units[stage_unit[int(index)]].append((name, p))
        else:
            raise ValueError(f'FreezeOut does not know which unit {name} belongs to')
    return units


def prune_decoders(model, stages):
    """Replaces the decoders of `stages` by parameterless placeholders: their memory is freed and the model's
    state dict (so its checkpoints) no longer has `decoder.<k>.*`. A model gets the same placeholders before
    loading such a checkpoint (run_pretrain reads them from the checkpoint's `pruned_stages`)."""
    for k in stages:
        model.decoder[k] = nn.Identity()


def pruned_stages(model):
    return [k for k, decoder in enumerate(model.decoder) if isinstance(decoder, nn.Identity)]


class FreezeOut:
    """The engine's lr schedule when --how_scale is given: sets per-unit lrs and freezes units."""

    def __init__(self, model, schedule, prune=False):
        self.model, self.schedule, self.prune = model, schedule, prune
        self.units = unit_parameters(model)
        self.on_freeze = []

    def param_groups(self, weight_decay):
        """Two groups per unit (no decay: biases and 1-D parameters, as timm's param_groups_weight_decay)."""
        groups = []
        for unit, named in enumerate(self.units):
            no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith('.bias')]
            decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith('.bias'))]
            groups += [{'params': ps, 'weight_decay': wd, 'unit': unit}
                       for ps, wd in ((no_decay, 0.0), (decay, weight_decay)) if ps]
        return groups

    def adjust(self, optimizer, epoch):
        """At an accumulation-window start: freeze what is due, set every group's lr; returns the last unit's lr."""
        due = self.schedule.frozen_units(epoch)
        if due > self.model.frozen_units:
            self.freeze(optimizer, due)
        for group in optimizer.param_groups:
            group['lr'] = self.schedule.lr(group['unit'], epoch)
        return self.schedule.lr(len(self.units) - 1, epoch)

    def freeze(self, optimizer, num_units):
        """Freezes units [frozen_units, num_units): out of autograd and out of the optimizer."""
        newly = range(self.model.frozen_units, num_units)
        for unit in newly:
            for _, p in self.units[unit]:
                p.requires_grad_(False)
                p.grad = None
                optimizer.state.pop(p, None)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g['unit'] not in newly]
        self.model.frozen_units = num_units
        if self.prune:
            active = self.model.active_stages()
            prune_decoders(self.model, [k for k in range(len(self.model.decoder)) if k not in active])
            kept = {id(p) for p in self.model.parameters()}
            self.units = [[(n, p) for n, p in unit if id(p) in kept] for unit in self.units]
        print(f'FreezeOut: froze units {newly.start}..{newly.stop - 1}; '
              f'{len(self.units) - num_units} of {len(self.units)} units train')
        for callback in self.on_freeze:
            callback()

    def metrics(self):
        frozen = self.model.frozen_units
        return {'active_units': len(self.units) - frozen, 'frozen_depth': frozen}

    def state_dict(self):
        return {'frozen_units': self.model.frozen_units}
