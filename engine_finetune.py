"""One epoch of supervised training of a classifier (fine-tuning, linear probing), and its evaluation.

Training is engine_pretrain's epoch loop with a classification loss plugged in: accumulation with
DDP `no_sync`, AMP, clipping, non-finite steps and logging are shared, and so is the per-iteration
warmup + cosine lr, which multiplies each param group's lr by its `lr_scale`; that is all layer-wise
lr decay needs. Only the loss differs: targets go to the device, timm's Mixup/CutMix mixes them
with the images when enabled, and the criterion (util.classification.build_criterion: cross-entropy,
soft-target under mixup, or binary cross-entropy) compares them with the model's logits.

`evaluate` counts every validation sample exactly once: per-rank sums stay on the device and are
all-reduced once at the end when the ranks hold disjoint shards (see util/samplers.py).
"""
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3, accuracy
from torch.nn.parallel import DistributedDataParallel

import engine_pretrain
from util.dist import all_reduce_sum, get_world_size
from util.metric_logger import MetricLogger
from util.samplers import is_sharded


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def classification_loss(criterion, device, mixup_fn=None):
    """The engine's `compute_loss`: run under autocast, after the samples are on the device."""
    def compute_loss(model, samples, targets):
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:  # mixes the batch with its reverse; targets become soft (batch, classes)
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets)
    return compute_loss


def train_one_epoch(data_loader, trainer, device, epoch, args, criterion, mixup_fn=None, log_writer=None,
                    schedule=None, hooks=()):
    """One epoch of `trainer` (a util.train_step.TrainStep) over (images, labels) batches; returns the epoch
    means of the logged metrics (loss, lr, grad_norm). The logged lr is the schedule's, i.e. that of the
    groups with lr_scale 1 (the head under layer decay), the largest one."""
    return engine_pretrain.train_one_epoch(data_loader, trainer, device, epoch, args, log_writer=log_writer,
                                           schedule=schedule, hooks=hooks,
                                           compute_loss=classification_loss(criterion, device, mixup_fn))


class ModelEmaHook:
    """An exponential moving average of the weights (and buffers), updated after every optimizer step.

    Wraps timm's ModelEmaV3 around the bare model (not the DDP wrapper: every rank holds the same
    weights after a step, so each keeps an identical EMA without communication). Following timm's
    train.py the update gets `step=trainer.num_updates`: the first update copies the weights (decay 0),
    later ones use `decay` (or, with `warmup`, timm's rising decay 1 - (1 + step)^(-2/3), capped at decay).
    `state_dict()` holds the EMA model's own keys, so a saved EMA loads into a plain model too.
    """

    def __init__(self, model, decay=0.9999, warmup=False, device=None):
        self.ema = ModelEmaV3(unwrap(model), decay=decay, use_warmup=warmup, device=device)

    @property
    def module(self):
        """The EMA model (eval mode), e.g. for `evaluate(loader, ema.module, ...)`."""
        return self.ema.module

    def after_step(self, trainer):
        self.ema.update(unwrap(trainer.model), step=trainer.num_updates)

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, state):
        self.ema.module.load_state_dict(state)


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, sharded=None, print_freq=50):
    """Cross-entropy loss and top-1 / top-5 accuracy (percent) over the loader's dataset.

    `sharded`: whether the ranks evaluate disjoint parts of the set, whose sums are then all-reduced.
    None reads it from the loader (util.samplers.build_eval_loader: `--dist_eval` under DDP), so a loader
    that gives every rank the whole set is never summed W times. Use util.samplers for sharding: torch's
    DistributedSampler pads with duplicates, which would be counted. Top-5 is capped at the number of
    classes (timm.utils.accuracy), so it is 100 with 5 classes or fewer.
    Returns {'loss', 'acc1', 'acc5', 'count'}; `count` is the number of samples evaluated in all.
    """
    device = torch.device(device)
    # Evaluation needs no gradient sync, and a DDP forward may wait for peers (buffer broadcast), while
    # unpadded shards can give ranks different numbers of batches.
    model = unwrap(model)
    sharded = is_sharded(data_loader) if sharded is None else sharded
    images_per_step = (data_loader.batch_size or 1) * (get_world_size() if sharded else 1)
    meter = MetricLogger(len(data_loader), print_freq, 'Test:', images_per_step=images_per_step)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # sum of losses, correct@1, correct@5, samples
    was_training = model.training
    model.eval()
    try:
        for images, target in meter.log_every(data_loader):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            output = output.float()
            n = target.shape[0]
            loss = F.cross_entropy(output, target, reduction='sum')
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            sums[0] += loss.double()
            # accuracy() returns the batch's percentages; back to counts, rounded to the integers they are
            sums[1:3] += (torch.stack([acc1, acc5]).double() * n / 100).round()
            sums[3] += n
            meter.update(loss=loss / n)
    finally:
        model.train(was_training)
    if sharded:
        all_reduce_sum(sums)
    loss_sum, correct1, correct5, count = sums.tolist()  # the one host sync
    if count == 0:
        raise ValueError('evaluate: the validation loader yielded no samples')
    stats = {'loss': loss_sum / count, 'acc1': 100 * correct1 / count, 'acc5': 100 * correct5 / count,
             'count': int(count)}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats
