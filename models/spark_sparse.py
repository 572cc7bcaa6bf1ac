"""SparK's "sparse" encoder: masked dense layers for timm CNNs
(https://github.com/keyu-tian/SparK/blob/main/pretrain/encoder.py).

SparK never runs a real sparse convolution: every layer runs densely and its output is re-masked (masked
positions are exact zeros), and normalisation layers compute their statistics over the visible positions
only, so the CNN sees only the visible patches, as a sparse CNN would.

The active mask (bool [B, 1, f, f], True = visible, f = input_size // 32) lives in an `ActiveMask` holder
owned by one `SparseEncoder`, not in a module global, so two encoders in one process never see each other's
mask; without a mask every sparse layer runs exactly as its dense original. The sparse layers subclass the
dense ones and only override `forward`, so state-dict keys are those of the dense timm model.
"""
import contextlib
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.resnet import ResNet

from models.grad_ckpt import checkpointed


class ActiveMask:
    """Holds the active mask [B, 1, f, f] (bool, True = visible) shared by one model's sparse layers.

    `mask` is None outside a masked forward; layers then behave as their dense originals. The mask upsampled
    to each feature-map size, and its visible positions, are computed once per forward and reused by every
    layer at that size.
    """

    def __init__(self):
        self.mask = None
        self._cache = {}

    def set(self, active_b1ff):
        if active_b1ff is not None:
            if active_b1ff.dim() != 4 or active_b1ff.shape[1] != 1:
                raise ValueError(f'active_b1ff must have shape [B, 1, f, f], got {tuple(active_b1ff.shape)}')
            active_b1ff = active_b1ff.bool()
        self.mask = active_b1ff
        self._cache = {}

    def clear(self):
        self.set(None)

    @contextlib.contextmanager
    def using(self, active_b1ff):
        """Sets the mask for the block and restores the previous one (and its cached sizes) afterwards."""
        saved = self.mask, self._cache
        self.set(active_b1ff)
        try:
            yield self
        finally:
            self.mask, self._cache = saved

    def expand(self, h, w):
        """The mask nearest-upsampled to [B, 1, h, w] (bool), or None when no mask is set."""
        if self.mask is None:
            return None
        key = (h, w)
        if key not in self._cache:
            fh, fw = self.mask.shape[-2:]
            if h % fh or w % fw:
                raise ValueError(f'feature map {h}x{w} is not a multiple of the mask grid {fh}x{fw}; '
                                 'the input size must be a multiple of the downsample ratio')
            self._cache[key] = self.mask.repeat_interleave(h // fh, dim=2).repeat_interleave(w // fw, dim=3)
        return self._cache[key]

    def visible(self, h, w):
        """(b, i, j) index tensors of the visible positions of the [B, h, w] map (one nonzero per size, which
        on a GPU is also one host sync per size instead of one per layer)."""
        key = ('visible', h, w)
        if key not in self._cache:
            self._cache[key] = self.expand(h, w)[:, 0].nonzero(as_tuple=True)
        return self._cache[key]


class _Sparse:
    """Mixin: the `holder` argument and attribute and the masking helpers shared by all sparse layers."""
    holder = None

    def __init__(self, *args, holder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.holder = holder

    def _active(self, h, w):
        return None if self.holder is None else self.holder.expand(h, w)

    def _remask(self, y):
        """y [B, C, H, W] times the mask at y's resolution (exact zeros at masked positions), in place: y is
        always a fresh output that its layer's backward does not need."""
        act = self._active(y.shape[2], y.shape[3])
        return y if act is None else y.mul_(act)


class SparseConv2d(_Sparse, nn.Conv2d):
    def forward(self, x):
        return self._remask(super().forward(x))


class SparseMaxPooling(_Sparse, nn.MaxPool2d):
    def forward(self, x):
        if self.return_indices:
            raise NotImplementedError('SparseMaxPooling does not support return_indices=True')
        return self._remask(super().forward(x))


class SparseAvgPooling(_Sparse, nn.AvgPool2d):
    def forward(self, x):
        return self._remask(super().forward(x))


class _SparseBNForward(_Sparse):
    """BN over the visible positions: gather them into [N_visible, C], run the parent BN on those rows (batch
    mean and biased variance for normalising; running stats updated with momentum and the unbiased variance,
    exactly as BN does), scatter back into zeros laid out in memory as x is (a channels-last output would turn
    every later layer channels-last, and slower)."""

    def _check_input_dim(self, input):
        if input.dim() != 2:  # the gathered rows; without a mask the parent's own check runs
            super()._check_input_dim(input)

    def forward(self, x):
        if self.holder is None or self.holder.mask is None:
            return super().forward(x)
        visible = self.holder.visible(x.shape[2], x.shape[3])  # (b, i, j) index tensors
        x_bhwc = x.permute(0, 2, 3, 1)
        y = super().forward(x_bhwc[visible])
        out = torch.zeros_like(x_bhwc)
        out[visible] = y
        return out.permute(0, 3, 1, 2)


class SparseBatchNorm2d(_SparseBNForward, nn.BatchNorm2d):
    pass


class SparseSyncBatchNorm2d(_SparseBNForward, nn.SyncBatchNorm):
    pass


class SparseLayerNorm(_Sparse, nn.LayerNorm):
    """Channels-last LayerNorm ([B, H, W, C], as in timm ConvNeXt blocks with conv_mlp=False).

    LN is per position, so LN over the gathered visible rows equals dense LN with masked positions
    forced to 0; we compute the latter (cheaper, same gradients at visible positions)."""

    def forward(self, x):
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.holder is None or self.holder.mask is None:
            return y
        if x.dim() != 4:
            raise NotImplementedError('SparseLayerNorm with a mask expects a 4-D [B, H, W, C] input')
        act = self._active(x.shape[1], x.shape[2])            # [B, 1, H, W]
        return y.mul_(act.permute(0, 2, 3, 1))


class SparseLayerNorm2d(_Sparse, LayerNorm2d):
    """Channels-first LayerNorm over C of [B, C, H, W] (timm LayerNorm2d: ConvNeXt stem/downsample)."""

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self._remask(y.permute(0, 3, 1, 2))


class SparseConvNeXtBlock(_Sparse, ConvNeXtBlock):
    """timm ConvNeXtBlock re-masked after layer scale, before the residual add: the MLP's Linear
    biases would otherwise make masked positions non-zero."""

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self._remask(x)
        return self.drop_path(x) + self.shortcut(shortcut)


def _swap(m, cls, holder):
    """Turn the (already copied) dense module m into its sparse subclass in place: same weights,
    buffers, hooks and attributes, no re-initialisation (so no RNG is consumed)."""
    m.__class__ = cls
    m.holder = holder
    return m


def _convert(m, holder, sbn):
    if isinstance(m, nn.Conv2d):
        if type(m) is not nn.Conv2d:
            warnings.warn(f'{type(m).__name__} is converted to SparseConv2d; its custom forward is lost')
        return _swap(m, SparseConv2d, holder)
    if isinstance(m, nn.MaxPool2d):
        return _swap(m, SparseMaxPooling, holder)
    if isinstance(m, nn.AvgPool2d):
        return _swap(m, SparseAvgPooling, holder)
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        cls = SparseSyncBatchNorm2d if sbn else SparseBatchNorm2d
        new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, holder=holder,
                  device=(m.weight if m.affine else m.running_mean).device,
                  dtype=(m.weight if m.affine else m.running_mean).dtype)
        new.load_state_dict(m.state_dict())
        new.train(m.training)
        if hasattr(m, 'qconfig'):
            new.qconfig = m.qconfig
        for p_new, p_old in zip(new.parameters(), m.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new
    if isinstance(m, LayerNorm2d):
        return _swap(m, SparseLayerNorm2d, holder)
    if isinstance(m, nn.LayerNorm):
        return _swap(m, SparseLayerNorm, holder)
    if isinstance(m, ConvNeXtBlock):
        _swap(m, SparseConvNeXtBlock, holder)           # children are converted below
    elif isinstance(m, (nn.Conv1d, nn.ConvTranspose2d, nn.GroupNorm)):
        raise NotImplementedError(f'no sparse version of {type(m).__name__}; write one (SparK issues #54, #56)')
    for name, child in list(m.named_children()):
        m.add_module(name, _convert(child, holder, sbn))
    return m


def dense_model_to_sparse(module, holder, sbn=False):
    """Return a sparse twin of `module` whose sparse layers read their mask from `holder`.

    The input module is not modified (it is deep-copied first). Conv2d, MaxPool2d, AvgPool2d,
    BatchNorm2d/SyncBatchNorm (-> SyncBN variant if sbn), LayerNorm2d, LayerNorm and timm's
    ConvNeXtBlock become their sparse subclasses with identical weights, buffers and state-dict
    keys; everything else (Linear, activations, DropPath, ...) is kept. Global/adaptive pooling,
    SE and GroupNorm have no sparse version.
    """
    return _convert(copy.deepcopy(module), holder, sbn)


# ---------------------------------------------------------------- activation checkpointing

def run_checkpointed(module, x, holder=None):
    """module(x), keeping only x for the backward, which recomputes module(x) with the sparse mask of this call
    set again in `holder` (the encoder has cleared it by then); BN statistics and drop path as in
    models/grad_ckpt.py."""
    mask = None if holder is None else holder.mask
    return checkpointed(module, x, recompute_context=(lambda: holder.using(mask)) if holder is not None
                        else contextlib.nullcontext)


# ---------------------------------------------------------------- backbone contract (models/spark_custom_cnn.py)

def get_downsample_ratio(cnn):
    if hasattr(cnn, 'get_downsample_ratio'):
        return cnn.get_downsample_ratio()
    if isinstance(cnn, (ResNet, ConvNeXt)):
        return 32
    raise TypeError(f'{type(cnn).__name__} is not a supported SparK backbone: use a timm resnet*/'
                    'convnext_* or give it get_downsample_ratio/get_feature_map_channels/'
                    'forward(x, hierarchical=True) as models/spark_custom_cnn.py shows')


def get_feature_map_channels(cnn):
    if hasattr(cnn, 'get_feature_map_channels'):
        return list(cnn.get_feature_map_channels())
    if isinstance(cnn, ResNet):                                # skip the stride-2 stem entry
        return [info['num_chs'] for info in cnn.feature_info[1:]]
    if isinstance(cnn, ConvNeXt):
        return [info['num_chs'] for info in cnn.feature_info]
    get_downsample_ratio(cnn)                                  # raises the clear TypeError
    raise AssertionError('unreachable')


def drop_unused_modules(cnn):
    """timm ResNet / ConvNeXt: the modules `hierarchical_forward` never runs (the classifier; ConvNeXt's head
    norm and pre-head norm, which timm keeps even with num_classes=0) become Identity, in place. The encoder
    then holds only parameters the SparK forward uses (as the official ConvNeXt with identity norm/fc): DDP
    without find_unused_parameters needs that, and the exported encoder has no stray `head.*` keys.
    Custom models (with get_downsample_ratio) are left alone: build them without a classifier."""
    if isinstance(cnn, ResNet) and not hasattr(cnn, 'get_downsample_ratio'):
        cnn.fc = nn.Identity()
    elif isinstance(cnn, ConvNeXt) and not hasattr(cnn, 'get_downsample_ratio'):
        cnn.norm_pre = nn.Identity()
        cnn.head = nn.Identity()
    return cnn


def hierarchical_forward(cnn, x, run_block=None):
    """List of the 4 stage outputs of cnn for x, largest first (1/4, 1/8, 1/16, 1/32). With run_block, each
    residual block of a timm ResNet / ConvNeXt runs as run_block(block, x) (activation checkpointing)."""
    if isinstance(cnn, ResNet) and not hasattr(cnn, 'get_downsample_ratio'):
        x = cnn.maxpool(cnn.act1(cnn.bn1(cnn.conv1(x))))
        feats = []
        for layer in (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4):
            if run_block is None:
                x = layer(x)
            else:
                for block in layer:
                    x = run_block(block, x)
            feats.append(x)
        return feats
    if isinstance(cnn, ConvNeXt) and not hasattr(cnn, 'get_downsample_ratio'):
        x = cnn.stem(x)
        feats = []
        for stage in cnn.stages:
            if run_block is None:
                x = stage(x)
            else:
                x = stage.downsample(x)
                for block in stage.blocks:
                    x = run_block(block, x)
            feats.append(x)
        return feats
    if hasattr(cnn, 'get_downsample_ratio'):                   # custom-model route (models/spark_custom_cnn.py)
        return list(cnn(x, hierarchical=True))
    get_downsample_ratio(cnn)
    raise AssertionError('unreachable')


class SparseEncoder(nn.Module):
    """A timm CNN turned sparse. forward(x, active_b1ff) -> list of feature maps, largest first;
    state-dict keys are `sp_cnn.` + the dense model's keys, less those of `drop_unused_modules`."""

    def __init__(self, cnn, input_size, sbn=False):
        super().__init__()
        self.downsample_ratio = get_downsample_ratio(cnn)
        if input_size % self.downsample_ratio:
            raise ValueError(f'input_size={input_size} is not divisible by the downsample ratio '
                             f'{self.downsample_ratio} of {type(cnn).__name__}')
        self.input_size = input_size
        self.enc_feat_map_chs = get_feature_map_channels(cnn)
        self.holder = ActiveMask()
        self.sp_cnn = drop_unused_modules(dense_model_to_sparse(cnn, self.holder, sbn=sbn))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        """Recompute each residual block's activations in the backward instead of keeping them (timm ResNets
        and ConvNeXts; a custom CNN checkpoints inside its own forward if it wants to)."""
        self.grad_checkpointing = enable

    def get_downsample_ratio(self):
        return self.downsample_ratio

    def get_feature_map_channels(self):
        return list(self.enc_feat_map_chs)

    def forward(self, x, active_b1ff=None):
        """x [B, 3, H, W]; active_b1ff bool [B, 1, H/32, W/32] (True = visible) or None (dense).

        The input is multiplied by the upsampled mask (a no-op when it is already masked)."""
        h, w = x.shape[-2:]
        r = self.downsample_ratio
        if h % r or w % r:
            raise ValueError(f'input {h}x{w} is not divisible by the downsample ratio {r}')
        if active_b1ff is not None:
            if tuple(active_b1ff.shape) != (x.shape[0], 1, h // r, w // r):
                raise ValueError(f'active_b1ff must have shape {(x.shape[0], 1, h // r, w // r)}, '
                                 f'got {tuple(active_b1ff.shape)}')
            active_b1ff = active_b1ff.to(x.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        with self.holder.using(active_b1ff):
            act = self.holder.expand(h, w)
            if act is not None:
                x = x * act
            run_block = (lambda block, inp: run_checkpointed(block, inp, self.holder)) if ckpt else None
            return hierarchical_forward(self.sp_cnn, x, run_block)
