"""What supervised training of a classifier (fine-tuning, linear probing) adds to engine.py's loop: its
loss, its evaluation, and the evaluation of a saved checkpoint (`--eval`).

Training is engine.train_one_epoch with `classification_loss` as its `compute_loss`: accumulation with
DDP `no_sync`, AMP, clipping, non-finite steps and logging are shared, and so is the per-iteration
warmup + cosine lr, which multiplies each param group's lr by its `lr_scale`; that is all layer-wise
lr decay needs. Only the loss differs: targets go to the device, timm's Mixup/CutMix mixes them
with the images when enabled, and the criterion (util.classification.build_criterion: cross-entropy,
soft-target under mixup, or binary cross-entropy) compares them with the model's logits.

`evaluate` counts every validation sample exactly once: per-rank sums stay on the device and are
all-reduced once at the end when the ranks hold disjoint shards (see util/data/samplers.py).
"""
import torch
import torch.nn.functional as F
from timm.utils import accuracy

from util.checkpoint import load_checkpoint
from util.data.bad_files import bad_files_of, write_bad_file_list
from util.data.samplers import is_sharded
from util.dist import all_reduce_sum, get_world_size, unwrap
from util.metric_logger import MetricLogger
from util.runtime import resume_path


def classification_loss(criterion, device, mixup_fn=None):
    """The engine's `compute_loss`: run under autocast, after the samples are on the device."""
    def compute_loss(model, samples, targets):
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:  # mixes the batch with its reverse; targets become soft (batch, classes)
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets)
    return compute_loss


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, sharded=None, print_freq=50):
    """Cross-entropy loss and top-1 / top-5 accuracy (percent) over the loader's dataset.

    `sharded`: whether the ranks evaluate disjoint parts of the set, whose sums are then all-reduced.
    None reads it from the loader (util.data.samplers.build_eval_loader: `--dist_eval` under DDP), so a loader
    that gives every rank the whole set is never summed W times. Use util.data.samplers for sharding: torch's
    DistributedSampler pads with duplicates, which would be counted. Top-5 is capped at the number of
    classes (timm.utils.accuracy), so it is 100 with 5 classes or fewer.
    Returns {'loss', 'acc1', 'acc5', 'count'}; `count` is the number of samples evaluated in all. Samples that
    could not be read are left out (util.data.bad_files.collate_readable); then 'skipped_files' counts them.
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
        for batch in meter.log_every(data_loader):
            if batch is None:  # no sample of the batch could be read
                continue
            images, target = batch
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
    bad_files = bad_files_of(getattr(data_loader, 'dataset', None))
    skipped = bad_files.count() if bad_files is not None else 0
    if count == 0:
        raise ValueError(f'evaluate: the validation loader yielded no samples ({skipped} unreadable)')
    stats = {'loss': loss_sum / count, 'acc1': 100 * correct1 / count, 'acc5': 100 * correct5 / count,
             'count': int(count)}
    if skipped:
        stats['skipped_files'] = skipped
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} on {int(count)} samples"
          + (f' ({skipped} unreadable, left out)' if skipped else ''))
    return stats


def evaluate_checkpoint(args, model, val_loader, device, amp_dtype=None, classifier=None):
    """--eval: loads the weights of --resume (or, with --auto_resume, the newest checkpoint in --output_dir)
    into `model` and evaluates `classifier` (default: the model) on the validation set. Returns the stats and
    the loaded checkpoint, for a script that evaluates more of it (SLaK's EMA weights)."""
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    if not path:
        raise ValueError('--eval needs a checkpoint: give --resume PATH (a checkpoint this script wrote)')
    ckpt = load_checkpoint(path, model)
    print(f'evaluating {path} (epoch {ckpt.get("epoch")})')
    stats = evaluate(val_loader, classifier or model, device, amp_dtype, print_freq=args.print_freq)
    write_bad_file_list(args.output_dir, val_loader.dataset)
    return stats, ckpt
