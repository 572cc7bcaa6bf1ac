"""Frozen-prefix feature cache for FreezeOut (`--freeze_cache`): skip recomputing frozen blocks.

Reusing a frozen prefix's output is exact only if the prefix sees the same input every time: same
crop, same flip and same MIM mask. So with the cache on, every sample keeps ONE view for the whole
run (`FixedViews`: crop and flip seeded by the sample index) and one mask (noise seeded likewise).
That is a different, less diverse pretext task than standard LocalMIM: use it knowingly.

Masking features that were computed from the unmasked image is a different method with a leak
(after one attention block, visible tokens have attended to the masked patches): it is offered only
as the experiment `--feature_masking` (util/freezeout/feature_masking.py), which shares this file's storage.

Entries are keyed by sample index and remember the frozen depth they were computed at. When the depth
grows they stay: a stored prefix of depth k is carried through blocks k..k'-1 when next loaded
(`SampleStore.load_current`), which costs those few blocks instead of the whole prefix from the image and
gives the same values (to float rounding). It lives in memory or in a folder (one subfolder per process),
up to `max_bytes` (then it stops adding).
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
    """Per-sample tensors and the frozen depth they belong to, in memory or as one file per sample in
    `folder`/rank<r>; `hits`, `misses` and `advanced` (hits of a shallower depth) count samples."""

    def __init__(self, max_bytes, folder=None):
        self.max_bytes = max_bytes
        self.folder = Path(folder) / f'rank{get_rank()}' if folder else None  # processes never share files
        self.depth, self.entries, self.bytes = 0, {}, 0  # entries: index -> (depth, tensors or path, bytes)
        self.hits = self.misses = self.advanced = 0

    def set_depth(self, depth):
        """The frozen depth of the next loads. Entries stay when it grows; at the first depth of a run (files of an
        earlier run are not trusted) or a shallower one the store is emptied."""
        if depth == self.depth:
            return
        if self.depth == 0 or depth < self.depth:
            self.clear()
        self.depth = depth

    def clear(self):
        self.entries, self.bytes = {}, 0
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)

    def load(self, index):
        """(depth, tensors) of a stored sample, or None."""
        entry = self.entries.get(index)
        if entry is None:
            return None
        return entry[0], torch.load(entry[1], weights_only=True) if self.folder else entry[1]

    def store(self, index, tensors):
        """Stores (or replaces) a sample's tensors at the current depth, unless that would pass max_bytes."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        old = self.entries[index][2] if index in self.entries else 0
        if self.bytes - old + size > self.max_bytes:
            return
        payload = tuple(t.detach().cpu().clone() for t in tensors)
        if self.folder:
            path = self.folder / f'{index}.pt'
            torch.save(payload, path)
            payload = path
        self.entries[index] = (self.depth, payload, size)
        self.bytes += size - old

    def load_current(self, indices, advance):
        """The stored tensors of each of `indices` at the current depth (None where not stored). Those stored at a
        shallower depth are advanced, one batch per depth: `advance(first tensors [n, ...], from_depth)` gives them
        at this depth (the other tensors, a mask and its order, do not depend on it); they are stored again."""
        loaded = [self.load(index) for index in indices]
        out = [None if entry is None else entry[1] for entry in loaded]
        shallower = {}
        for row, entry in enumerate(loaded):
            if entry is not None and entry[0] != self.depth:
                shallower.setdefault(entry[0], []).append(row)
        for depth, rows in shallower.items():
            first = torch.stack([out[row][0] for row in rows])
            for row, tensor in zip(rows, advance(first, depth).to(first.dtype).cpu()):
                out[row] = (tensor, *out[row][1:])
                self.store(indices[row], out[row])
            self.advanced += len(rows)
        return out


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
        """Model inputs for a batch: the fixed noise and, once units are frozen, the frozen prefix. Each sample's is
        served as stored, carried on from a shallower stored depth, or computed from the image (only the samples of
        the batch that have none: a few new samples must not cost the whole batch's prefix)."""
        noise = self.noise(indices, samples.device)
        depth = self.model.frozen_units
        if depth == 0:
            return {'noise': noise}
        self.set_depth(depth)
        indices = [int(i) for i in indices]
        rows = self.load_current(
            indices, lambda tokens, stored: self.model.advance_frozen(tokens.to(samples.device), stored, depth))
        missing = [row for row, entry in enumerate(rows) if entry is None]
        self.hits, self.misses = self.hits + len(indices) - len(missing), self.misses + len(missing)
        if missing:
            every = len(missing) == len(indices)
            fresh = self.model.forward_prefix(samples if every else samples[missing], mask_ratio,
                                              noise if every else noise[missing])
            for j, row in enumerate(missing):
                rows[row] = tuple(t[j] for t in fresh)
                self.store(indices[row], rows[row])
            if every:
                return {'noise': noise, 'prefix': fresh}
        prefix = tuple(torch.stack([r[j] for r in rows]).to(samples.device) for j in range(3))
        return {'noise': noise, 'prefix': prefix}

    def compute_loss(self, mask_ratio):
        """The engine's `compute_loss` with this cache: batches from `FixedViews` carry sample indices."""
        return lambda model, samples, indices: model(samples, mask_ratio=mask_ratio,
                                                     **self.forward_kwargs(samples, indices, mask_ratio))
