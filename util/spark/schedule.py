"""SparK's per-iteration schedules and parameter groups, as the official
https://github.com/keyu-tian/SparK/blob/main/pretrain/utils/lr_control.py.

LR: linear warmup from 0.5% of the peak over `wp_ep` epochs, then cosine down to 0.1% of the peak,
reached at the last iteration. WD: cosine INCREASE from `wd` to `wde` over all of training (no warmup).
Both are functions of the iteration index cur_it = it + ep * iters_per_epoch.
"""
import math

NOWD_KEYS = ('cls_token', 'pos_embed', 'mask_token', 'gamma')


def spark_lr(cur_it, wp_it, max_it, peak_lr):
    if cur_it < wp_it:
        return peak_lr * (0.005 + 0.995 * cur_it / wp_it)
    ratio = (cur_it - wp_it) / max(max_it - 1 - wp_it, 1)
    return peak_lr * (0.001 + 0.999 * (0.5 + 0.5 * math.cos(math.pi * ratio)))


def spark_wd(cur_it, max_it, wd, wde):
    ratio = cur_it / max(max_it - 1, 1)
    return wde + (wd - wde) * (0.5 + 0.5 * math.cos(math.pi * ratio))


class SparkSchedule:
    """The engine's schedule object: `adjust(optimizer, epoch_float)` at each step sets every group's lr
    (times its `lr_scale`) and weight decay (times its `weight_decay_scale`; 0-scale groups stay 0)."""

    def __init__(self, peak_lr, wd, wde, ep, wp_ep, iters_per_epoch):
        self.peak_lr, self.wd, self.wde = peak_lr, wd, (wde or wd)
        self.iters = iters_per_epoch
        self.wp_it, self.max_it = round(wp_ep * iters_per_epoch), ep * iters_per_epoch
        self.cur_wd = self.wd

    def cur_it(self, epoch_float):
        return int(round(epoch_float * self.iters))

    def adjust(self, optimizer, epoch_float):
        it = self.cur_it(epoch_float)
        lr = spark_lr(it, self.wp_it, self.max_it, self.peak_lr)
        self.cur_wd = spark_wd(it, self.max_it, self.wd, self.wde)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
            group['weight_decay'] = self.cur_wd * group.get('weight_decay_scale', 1.0)
        return lr

    def metrics(self):
        return {'wd': self.cur_wd}


def spark_param_groups(model, nowd_keys=NOWD_KEYS):
    """The official `get_param_groups`: 'decay' (weight_decay_scale 1) and 'no_decay' (scale 0: 1-D, '.bias', or a
    name with a nowd key), each group created when its first parameter comes. For a SparK model the parameters
    are taken in the official module's order and names (`official_named_parameters`), so the optimizer state
    is laid out as the official one and official optimizer states load as they are."""
    named = model.official_named_parameters() if hasattr(model, 'official_named_parameters') \
        else model.named_parameters()
    groups = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith('.bias') or any(k in name for k in nowd_keys)
        key = 'no_decay' if no_decay else 'decay'
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': 0.0, 'weight_decay_scale': 0.0 if no_decay else 1.0,
                           'lr_scale': 1.0}
        groups[key]['params'].append(p)
    return list(groups.values())
