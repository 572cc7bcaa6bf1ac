"""Frozen-prefix feature cache for FreezeOut (`--freeze_cache`): skip recomputing frozen blocks.

Reusing a frozen prefix's output is exact only if the prefix sees the same input every time: same
crop, same flip and same MIM mask. So with the cache on, every sample keeps ONE view for the whole
run (`FixedViews`: crop and flip seeded by the sample index) and one mask (noise seeded likewise).
That is a different, less diverse pretext task than standard LocalMIM: use it knowingly.

Masking features that were computed from the unmasked image is a different method with a leak
(after one attention block, visible tokens have attended to the masked patches): it is offered only
as the experiment `--feature_masking` (util/freezeout/feature_masking.py), which shares this file's storage.

Entries are keyed by sample index at the current frozen depth; when the depth grows the store is
emptied and refilled. It lives in memory or in a folder (one subfolder per process), up to
`max_bytes` (then it stops adding).
"""
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util.dist import get_rank

_SEED_STRIDE = 1_000_003


class FixedViews(Dataset):
    """Each sample always gets the same random crop and flip; yields (image, sample index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * _SEED_STRIDE + index)
            sample, _ = self.dataset[index]
        return sample, index


class SampleStore:
    """Per-sample tensors of one frozen depth, in memory or as one file per sample in `folder`/rank<r>."""

    def __init__(self, max_bytes, folder=None):
        self.max_bytes = max_bytes
        self.folder = Path(folder) / f'rank{get_rank()}' if folder else None  # processes never share files
        self.depth, self.entries, self.bytes = 0, {}, 0
        self.hits = self.misses = 0

    def reset(self, depth):
        self.depth, self.entries, self.bytes = depth, {}, 0
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)

    def load(self, index):
        entry = self.entries.get(index)
        if entry is None or not self.folder:
            return entry
        return torch.load(entry, weights_only=True)

    def store(self, index, tensors):
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.bytes + size > self.max_bytes:
            return
        tensors = tuple(t.detach().cpu().clone() for t in tensors)
        if self.folder:
            path = self.folder / f'{index}.pt'
            torch.save(tensors, path)
            tensors = path
        self.entries[index] = tensors
        self.bytes += size


class FrozenPrefixCache(SampleStore):
    def __init__(self, model, seed, max_bytes, folder=None):
        super().__init__(max_bytes, folder)
        self.model, self.seed = model, seed
        self.num_patches = model.grid_size ** 2

    def noise(self, indices, device):
        """The fixed mask noise of each sample: [B, L]."""
        return torch.stack([torch.rand(self.num_patches, generator=torch.Generator().manual_seed(
            self.seed * _SEED_STRIDE + int(i) + 1)) for i in indices]).to(device)

    def forward_kwargs(self, samples, indices, mask_ratio):
        """Model inputs for a batch: the fixed noise and, once units are frozen, the frozen prefix."""
        noise = self.noise(indices, samples.device)
        depth = self.model.frozen_units
        if depth == 0:
            return {'noise': noise}
        if depth != self.depth:
            self.reset(depth)
        cached = [self.load(int(i)) for i in indices]
        if all(c is not None for c in cached):
            self.hits += len(cached)
            prefix = tuple(torch.stack([c[j] for c in cached]).to(samples.device) for j in range(3))
        else:
            self.misses += len(cached)
            prefix = self.model.forward_prefix(samples, mask_ratio, noise)
            for row, index in enumerate(indices):
                if cached[row] is None:
                    self.store(int(index), tuple(t[row] for t in prefix))
        return {'noise': noise, 'prefix': prefix}

    def compute_loss(self, mask_ratio):
        """The engine's `compute_loss` with this cache: batches from `FixedViews` carry sample indices."""
        return lambda model, samples, indices: model(samples, mask_ratio=mask_ratio,
                                                     **self.forward_kwargs(samples, indices, mask_ratio))
