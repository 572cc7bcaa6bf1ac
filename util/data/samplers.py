"""Evaluation data loading in which every validation sample is counted exactly once, and repeated augmentation.

torch's DistributedSampler pads the index list to a multiple of the world size, so with
`--dist_eval` the official code evaluates a few duplicated images whenever the validation set
does not divide evenly (50,000 images on 3, 6 or 7 GPUs). `UnpaddedDistributedSampler` hands out
strided, disjoint shards instead; some ranks get one sample fewer, which is harmless because
`engine_finetune.evaluate` all-reduces sums only once, after its loop.

`evaluate` reads from the loader's sampler whether the ranks hold disjoint shards (sums are
all-reduced) or each holds the whole set (sums stay local): `build_eval_loader` is the one place that
decides, so the two cannot disagree.

`with_repeated_augmentation` swaps a training loader's sampler for timm's RepeatAugSampler (DeiT's repeated
augmentation, used by SparK's ConvNeXt fine-tuning). `RankStickySampler` keeps each training sample on one rank for
the whole run, for the per-rank caches of FreezeOut (`--freeze_cache`, `--feature_masking`).
"""
import math

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from util.data.bad_files import collate_readable
from util.dist import get_rank, get_world_size
from util.stop_signals import ignore_stop_signals


class UnpaddedDistributedSampler(Sampler):
    """Rank r gets indices r, r + W, r + 2W, ...: no padding, no duplicates, no shuffling."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f'rank {self.rank} is not in [0, {self.num_replicas})')
        self.indices = range(self.rank, len(dataset), self.num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch):
        """The order never changes; kept so entry scripts may call it on every sampler."""


class RankStickySampler(Sampler):
    """A training sampler whose shards never change: each sample stays on one rank for the whole run (so a rank's
    cache of per-sample features keeps hitting), and each epoch every rank reshuffles its own shard (seed + epoch).

    The shards depend on `seed` only: a random permutation of the samples, stably sorted by label when `labels` are
    given, dealt out in turn, so shards differ by at most one sample (per class too). A shorter shard repeats one of
    its samples, so every rank yields ceil(N / W) per epoch, as torch's DistributedSampler pads.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, seed=0, labels=None):
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f'rank {self.rank} is not in [0, {self.num_replicas})')
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        if labels is not None:
            order = order[torch.sort(torch.as_tensor(labels)[order], stable=True).indices]
        self.shard = order[self.rank::self.num_replicas].tolist()
        self.num_samples = math.ceil(len(dataset) / self.num_replicas)
        self.seed, self.epoch = seed, 0

    def __iter__(self):
        shuffled = torch.randperm(len(self.shard), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        indices = [self.shard[i] for i in shuffled]
        return iter(indices + indices[:self.num_samples - len(indices)])

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


def labels_of(dataset):
    """The per-sample class labels of a dataset (or of the one it wraps, `.dataset`), or None."""
    while dataset is not None:
        if getattr(dataset, 'targets', None) is not None:
            return dataset.targets
        dataset = getattr(dataset, 'dataset', None)
    return None


def is_sharded(data_loader):
    """True when the loader's sampler gives this rank only its part of the set (num_replicas > 1)."""
    return getattr(getattr(data_loader, 'sampler', None), 'num_replicas', 1) > 1


def build_eval_loader(dataset, batch_size, num_workers, pin_memory, dist_eval):
    """With `dist_eval` under DDP each rank evaluates a disjoint shard; otherwise every rank evaluates the
    whole set in order (the results then agree without communication). Unreadable samples (None) are dropped."""
    if dist_eval and get_world_size() > 1:
        sampler = UnpaddedDistributedSampler(dataset)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, worker_init_fn=ignore_stop_signals,
                      collate_fn=collate_readable)


def with_repeated_augmentation(loader, num_repeats):
    """`loader` (util.runtime.build_train_loader's) with timm's RepeatAugSampler: every image appears `num_repeats`
    times in a shuffled epoch, its copies on different processes (differently augmented), and each process sees
    len(dataset) / world_size samples per epoch (from 256 images on, the data set size rounded down to a multiple
    of 256), as in timm and DeiT. The shuffle depends on the epoch only (`set_epoch`), identically on every process."""
    if num_repeats < 1:
        raise ValueError(f'--repeated_aug must be >= 1, got {num_repeats}')
    sampler = RepeatAugSampler(loader.dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                               num_repeats=num_repeats)
    repeated = DataLoader(loader.dataset, sampler=sampler, batch_size=loader.batch_size,
                          num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          worker_init_fn=loader.worker_init_fn)
    if len(repeated) == 0:
        raise ValueError(f'with --repeated_aug {num_repeats} each process gets {len(sampler)} images per epoch, '
                         f'fewer than one batch of {loader.batch_size}')
    return repeated
