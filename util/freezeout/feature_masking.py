"""FreezeOut feature masking (`--feature_masking`): an experiment, NOT a faster equivalent of FreezeOut.

Once FreezeOut has frozen k >= 1 units, the frozen prefix runs once per sample and depth on the UNMASKED
image and all its token features are stored (memory or folder, `util.freezeout.cache.SampleStore`). Every
step then draws a fresh mask per sample, keeps the visible stored tokens in their order, and continues
through the active blocks and the active stages' decoders. Depth 0 is standard LocalMIM.

The leak: past one frozen block every stored patch token has attended to every patch, the masked ones
included, so the visible features carry the hidden content (`bench/leak_probe.py` measures how much).
At depth 1 only the token-wise patch embedding is frozen and nothing leaks.

Views: the stored features and the HOG targets must come from the same image, so each sample keeps one
crop and flip (`SwitchableViews`) from the first epoch that STARTS at depth >= 1. Until then (the rest
of the epoch in which the first unit freezes) views stay random and their features are computed at each
step, not stored. The switch depends only on the epoch, so runs and resumes replay exactly.

`--feature_target`: the active stages predict the HOG of the masked patches (as LocalMIM), the stored
frozen-depth features of the masked tokens (`features`: normalised per token, MSE, one linear head per
decoder, `decoder.k.feature_pred`), or the sum of both. At depth 0 there are no stored features: the
feature heads start training at the first freeze and, with `features`, the HOG heads stop there.
"""
import torch

from util.freezeout.cache import FixedViews, SampleStore

NOT_STORED = -1  # the sample index of a random view


class SwitchableViews(FixedViews):
    """The dataset's random views until `fixed` is set, then one fixed view per sample (FixedViews). Yields
    (image, sample index) for fixed views and (image, NOT_STORED) for random ones. Loader workers copy the
    dataset when an epoch starts: set `fixed` between epochs."""
    fixed = False

    def __getitem__(self, index):
        if self.fixed:
            return super().__getitem__(index)
        return self.dataset[index][0], NOT_STORED


class FeatureMasking(SampleStore):
    """The engine's `compute_loss` of feature masking (`compute_loss`), with the store of frozen-prefix features.

    `freezeout`: the run's util.freezeout.schedule.FreezeOut; build this before DDP is attached, so that at each freeze
    the feature heads switch on (and, for `features`, the HOG heads off) before the model is re-wrapped."""

    def __init__(self, freezeout, mask_ratio, max_bytes, folder=None):
        super().__init__(max_bytes, folder)
        self.model, self.schedule, self.mask_ratio = freezeout.model, freezeout.schedule, mask_ratio
        for decoder in self.model.decoder:
            if decoder.feature_pred is not None:  # nothing to predict before the first freeze
                decoder.feature_pred.requires_grad_(False)
        freezeout.on_freeze.append(self.on_freeze)

    def on_freeze(self):
        model = self.model
        for k in model.active_stages():  # FreezeOut itself took the frozen stages out
            decoder = model.decoder[k]
            if decoder.feature_pred is not None:
                decoder.feature_pred.requires_grad_(True)
            if model.feature_target == 'features':
                for p in decoder.pred.parameters():
                    p.requires_grad_(False)
                    p.grad = None

    def start_epoch(self, views, epoch):
        """Fixed views from the first epoch that starts with a frozen unit (before the epoch's loader starts)."""
        views.fixed = self.schedule.frozen_units(epoch) > 0

    def noise(self, samples):
        """A fresh mask per sample and step (the model's own draw at depth 0, so depth 0 replays LocalMIM)."""
        return torch.rand(len(samples), self.model.grid_size ** 2, device=samples.device)

    def features(self, samples, indices):
        """[B, 1 + L, D] frozen-prefix features of the unmasked samples: stored ones, the others computed (and stored
        for fixed views). Kept in the autocast dtype (bf16 halves the store), used in float32."""
        depth = self.model.frozen_units
        self.set_depth(depth)
        indices = indices.tolist()
        stored = self.load_current([i if i != NOT_STORED else None for i in indices],
                                   lambda x, at: self.model.advance_frozen(x.to(samples.device), at, depth))
        missing = [row for row, entry in enumerate(stored) if entry is None]
        self.hits, self.misses = self.hits + len(stored) - len(missing), self.misses + len(missing)
        if missing:
            device = samples.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
            fresh = self.model.frozen_features(samples if len(missing) == len(samples) else samples[missing])
            for row, features in zip(missing, fresh.to(dtype)):
                stored[row] = (features,)
                if indices[row] != NOT_STORED:
                    self.store(indices[row], (features,))
        return torch.stack([entry[0].to(samples.device, non_blocking=True) for entry in stored]).float()

    def compute_loss(self, model, samples, indices):
        """`model`: the trainer's model (maybe DDP-wrapped); `indices`: the sample indices SwitchableViews gives."""
        noise = self.noise(samples)
        if self.model.frozen_units == 0:
            return model(samples, mask_ratio=self.mask_ratio, noise=noise)
        features = self.features(samples, indices)
        prefix = self.model.mask_features(features, self.mask_ratio, noise)
        loss, logs = model(samples, prefix=prefix, features=features)
        return loss, {**logs, 'stored_samples': len(self.entries)}  # of this process
