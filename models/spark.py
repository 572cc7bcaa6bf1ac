"""SparK masked image modelling for CNNs: LightDecoder, densify layers, mask tokens and loss, as the official
https://github.com/keyu-tian/SparK/blob/main/pretrain/spark.py and decoder.py.

The CNN runs as a `SparseEncoder` (models/spark_sparse.py) on the masked image; its feature maps, smallest
(1/32) first, are densified (sparse norm, mask token at masked positions, projection) and added into a UNet
decoder that predicts the whole image. Module names and registration order are the official module's, so
official checkpoints load strictly and an official optimizer state lines up (`official_state_dict`,
`official_named_parameters`; ConvNeXt key names are mapped by models/convnext_keys.py).
"""
import math
import sys

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from timm.models.convnext import ConvNeXt

from models.convnext_keys import convnext_official_to_timm, convnext_timm_to_official, is_official_convnext, \
    official_convnext_order, timm_to_official_key
from models.spark_sparse import ActiveMask, SparseBatchNorm2d, SparseEncoder, SparseLayerNorm2d, \
    SparseSyncBatchNorm2d, run_checkpointed

# ready and tested; any other timm convnext_* works too
SPARK_MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200', 'convnext_atto',
                'convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large', 'your_convnet', 'your_convnet_32px')
ENCODER_PREFIX = 'sparse_encoder.sp_cnn.'
# Official pretraining kwargs per model (SparK pretrain/models/__init__.py); add your model's here.
SPARK_DEFAULT_KWARGS = {
    'your_convnet': {}, 'your_convnet_32px': {},
    'resnet50': {'drop_path_rate': 0.05}, 'resnet101': {'drop_path_rate': 0.08},
    'resnet152': {'drop_path_rate': 0.10}, 'resnet200': {'drop_path_rate': 0.15},
    'convnext_small': {'drop_path_rate': 0.2}, 'convnext_base': {'drop_path_rate': 0.3},
    'convnext_large': {'drop_path_rate': 0.4},
}


# ---------------------------------------------------------------- decoder

class UNetBlock(nn.Module):
    def __init__(self, cin, cout, bn2d):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, stride=1, padding=1, bias=False), bn2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False), bn2d(cout),
        )

    def forward(self, x):
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """log2(ratio) UNet blocks (2x ConvTranspose up, conv3x3-BN-ReLU6-conv3x3-BN), channels halving from
    `width`, then a 1x1 conv to 3 channels; each densified feature map is added before its block."""

    def __init__(self, up_sample_ratio, width=768, sbn=True):
        super().__init__()
        n = round(math.log2(up_sample_ratio))
        if up_sample_ratio < 2 or 2 ** n != up_sample_ratio:
            raise ValueError(f'up_sample_ratio must be a power of 2 (>= 2), got {up_sample_ratio}')
        self.width = width
        channels = [width // 2 ** i for i in range(n + 1)]
        bn2d = nn.SyncBatchNorm if sbn else nn.BatchNorm2d
        self.dec = nn.ModuleList([UNetBlock(cin, cout, bn2d) for cin, cout in zip(channels[:-1], channels[1:])])
        self.proj = nn.Conv2d(channels[-1], 3, kernel_size=1, stride=1, bias=True)
        self.grad_checkpointing = False
        self.initialize()

    def set_grad_checkpointing(self, enable=True):
        """Recompute each UNet block's activations in the backward instead of keeping them."""
        self.grad_checkpointing = enable

    def forward(self, to_dec):
        """to_dec: list of feature maps, SMALLEST first (None entries skipped) -> [B, 3, H, W]."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            x = run_checkpointed(block, x) if ckpt else block(x)
        return self.proj(x)

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.)
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                nn.init.constant_(m.weight, 1.)
                nn.init.constant_(m.bias, 0.)


# ---------------------------------------------------------------- SparK

def patchify(bchw, p):
    """[B, C, h*p, w*p] -> [B, h*w, p*p*C] (patches row-major; inside a patch row, col, channel)."""
    B, C, H, W = bchw.shape
    h, w = H // p, W // p
    x = bchw.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)    # B h w p q C
    return x.reshape(B, h * w, p * p * C)


def unpatchify(bln, p, h, w, C=3):
    """Exact inverse of patchify."""
    B = bln.shape[0]
    x = bln.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)      # B C h p w q
    return x.reshape(B, C, h * p, w * p)


class SparK(nn.Module):
    """forward(inp) -> loss: the mean over masked patches of the MSE to per-patch normalised targets of the
    unmasked input (mean, sqrt(unbiased var + 1e-6)). With vis=True: (inp, masked inp, reconstruction with
    the visible patches copied from inp), in inp's normalised space. Index 0 of the per-scale lists
    (densify_norms, densify_projs, mask_tokens) is the smallest (1/32) feature map."""

    def __init__(self, sparse_encoder, dense_decoder, mask_ratio=0.6, densify_norm='bn', sbn=False):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        input_size = sparse_encoder.input_size
        self.downsample_ratio = sparse_encoder.get_downsample_ratio()
        self.fmap_h = self.fmap_w = input_size // self.downsample_ratio
        self.mask_ratio = mask_ratio
        self.len_keep = round(self.fmap_h * self.fmap_w * (1 - mask_ratio))
        if self.len_keep < 1:
            raise ValueError(f'--input_size {input_size} gives a {self.fmap_h}x{self.fmap_w} mask grid (downsample '
                             f'ratio {self.downsample_ratio}) on which mask ratio {mask_ratio} leaves no patch '
                             f'visible: use a larger --input_size or a lower --mask')
        self.sparse_encoder = sparse_encoder
        self.dense_decoder = dense_decoder
        self.sbn = sbn
        self.densify_norm_str = densify_norm.lower()
        enc_chs = list(sparse_encoder.get_feature_map_channels())
        self.hierarchy = len(enc_chs)
        self.holder = ActiveMask()     # mask for the sparse densify norms (set only during forward)

        # registered in the official order (norms, projections, tokens): that order indexes the optimizer state
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        d_width = dense_decoder.width
        for i in range(self.hierarchy):
            e_width = enc_chs[-1 - i]                  # i = 0: the smallest (1/32) map
            p = nn.Parameter(torch.zeros(1, e_width, 1, 1))
            trunc_normal_(p, mean=0., std=.02, a=-.02, b=.02)
            self.mask_tokens.append(p)
            if self.densify_norm_str == 'bn':
                norm = (SparseSyncBatchNorm2d if sbn else SparseBatchNorm2d)(e_width, holder=self.holder)
            elif self.densify_norm_str == 'ln':
                norm = SparseLayerNorm2d(e_width, eps=1e-6, holder=self.holder)
            else:
                norm = nn.Identity()
            self.densify_norms.append(norm)
            if i == 0 and e_width == d_width:
                proj = nn.Identity()
            else:
                k = 1 if i == 0 else 3
                proj = nn.Conv2d(e_width, d_width, kernel_size=k, stride=1, padding=k // 2, bias=True)
            self.densify_projs.append(proj)
            d_width //= 2

        # deprecated, never used; registered only so official checkpoints load with strict=True
        self.register_buffer('imn_m', torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
        self.register_buffer('imn_s', torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1))
        self.register_buffer('norm_black', torch.zeros(1, 3, input_size, input_size))
        # the official SparK uses the FB ConvNeXt (other key names, other module order) where we use timm's
        self.official_convnext = isinstance(sparse_encoder.sp_cnn, ConvNeXt)

    # ------------------------------------------------------------ masking
    def mask(self, B, device, generator=None):
        """bool [B, 1, f, f] with exactly len_keep True (visible) per sample; drawn on the CPU."""
        h, w = self.fmap_h, self.fmap_w
        idx = torch.rand(B, h * w, generator=generator).argsort(dim=1)
        idx = idx[:, :self.len_keep].to(device)
        return torch.zeros(B, h * w, dtype=torch.bool, device=device).scatter_(1, idx, True).view(B, 1, h, w)

    # ------------------------------------------------------------ forward
    def forward(self, inp_bchw, active_b1ff=None, vis=False):
        B, C, H, W = inp_bchw.shape
        r = self.downsample_ratio
        if H % r or W % r:
            raise ValueError(f'input {H}x{W} is not divisible by the downsample ratio {r}')
        h, w = H // r, W // r
        if active_b1ff is None:
            if (h, w) != (self.fmap_h, self.fmap_w):
                raise ValueError(f'input {H}x{W} differs from input_size {self.fmap_h * r}; pass active_b1ff')
            active_b1ff = self.mask(B, inp_bchw.device)
        else:
            if tuple(active_b1ff.shape) != (B, 1, h, w):
                raise ValueError(f'active_b1ff must have shape {(B, 1, h, w)}, got {tuple(active_b1ff.shape)}')
            active_b1ff = active_b1ff.to(device=inp_bchw.device, dtype=torch.bool)
        active_b1hw = active_b1ff.repeat_interleave(r, 2).repeat_interleave(r, 3)
        masked_bchw = inp_bchw * active_b1hw

        # encode (largest first) -> smallest first
        fea_bcffs = list(self.sparse_encoder(masked_bchw, active_b1ff))
        fea_bcffs.reverse()

        # densify: sparse norm -> mask token at masked positions -> projection
        to_dec = []
        self.holder.set(active_b1ff)
        try:
            for i, bcff in enumerate(fea_bcffs):
                if bcff is not None:
                    cur_active = self.holder.expand(*bcff.shape[-2:])
                    bcff = self.densify_norms[i](bcff)
                    bcff = torch.where(cur_active, bcff, self.mask_tokens[i].to(bcff.dtype).expand_as(bcff))
                    bcff = self.densify_projs[i](bcff)
                to_dec.append(bcff)
        finally:
            self.holder.clear()

        rec_bchw = self.dense_decoder(to_dec)
        inp, rec = patchify(inp_bchw, r), patchify(rec_bchw, r)    # [B, L, r*r*C]
        mean = inp.mean(dim=-1, keepdim=True)
        std = (inp.var(dim=-1, keepdim=True) + 1e-6) ** .5
        target = (inp - mean) / std
        l2 = (rec - target).pow(2).mean(dim=-1)                     # [B, L]
        non_active = active_b1ff.logical_not().view(B, h * w).to(l2.dtype)
        loss = (l2 * non_active).sum() / (non_active.sum() + 1e-8)

        if not vis:
            return loss
        rec_denorm = unpatchify(rec * std + mean, r, h, w, C)
        rec_or_inp = torch.where(active_b1hw, inp_bchw, rec_denorm)
        return inp_bchw, masked_bchw, rec_or_inp

    # ------------------------------------------------------------ helpers
    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of the encoder's residual blocks and the decoder's UNet blocks: same loss,
        gradients and BN running statistics, less memory, about one more encoder + decoder forward of time."""
        self.sparse_encoder.set_grad_checkpointing(enable)
        self.dense_decoder.set_grad_checkpointing(enable)

    def get_config(self):
        return {
            'mask_ratio': self.mask_ratio, 'densify_norm_str': self.densify_norm_str, 'sbn': self.sbn,
            'hierarchy': self.hierarchy, 'sparse_encoder.input_size': self.sparse_encoder.input_size,
            'dense_decoder.width': self.dense_decoder.width,
        }

    def state_dict(self, *args, with_config=False, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if with_config:
            state['config'] = self.get_config()
        return state

    def official_name(self, name):
        """Our parameter/buffer name -> the official SparK module's (differs for ConvNeXt encoders only)."""
        return timm_to_official_key(name, ENCODER_PREFIX) if self.official_convnext else name

    def official_state_dict(self, with_config=False):
        """state_dict() under the official module's key names (same tensors)."""
        return {self.official_name(k): v for k, v in self.state_dict(with_config=with_config).items()}

    def official_named_parameters(self):
        """[(official name, parameter)] in the official module's registration order, the order that indexes
        an official optimizer state (encoder, decoder, densify norms, densify projections, mask tokens)."""
        named = dict(self.named_parameters())
        order = official_convnext_order(named, ENCODER_PREFIX) if self.official_convnext else list(named)
        return [(self.official_name(n), named[n]) for n in order]

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        state_dict = dict(state_dict)
        config = state_dict.pop('config', None)
        if is_official_convnext(state_dict, ENCODER_PREFIX):
            state_dict = convnext_official_to_timm(state_dict, ENCODER_PREFIX)
        ret = super().load_state_dict(state_dict, strict=strict, **kwargs)
        if config is not None:
            mine = self.get_config()
            for k, v in config.items():
                if mine.get(k) != v:
                    msg = f'config mismatch: {k}={v!r} in the checkpoint, {mine.get(k)!r} in this model'
                    if strict:
                        raise AttributeError(msg)
                    print(msg, file=sys.stderr)
        return ret


# ---------------------------------------------------------------- builders

def spark_default_drop_path(model_name):
    """The official pretraining drop path rate of a model (0 for models without a table entry)."""
    return SPARK_DEFAULT_KWARGS.get(model_name, {}).get('drop_path_rate', 0.0)


def densify_norm_of(model_name):
    """Official rule: 'bn' for ResNets, 'ln' for ConvNeXts, none for other models."""
    if 'resnet' in model_name:
        return 'bn'
    return 'ln' if 'convnext' in model_name or 'cnx' in model_name else ''


def build_spark(model_name, input_size=224, mask_ratio=0.6, sbn=False, dp=0.0, decoder_width=768):
    """SparK around the timm model `model_name` (any SparK-ready one: a timm ResNet/ConvNeXt, or a model
    with the three methods of models/spark_custom_cnn.py). `dp` is the encoder's drop path rate, used as given
    (main_spark.py turns --dp 0 into the official per-model rate, spark_default_drop_path, as the official code).
    The official decoder is always 768 wide; a small CNN's features need far less (its channels halve per
    upsampling block)."""
    if model_name not in timm.list_models(model_name):
        raise ValueError(f'unknown SparK model {model_name!r}; ready: {", ".join(SPARK_MODELS)}, '
                         f'or register your own (models/spark_custom_cnn.py)')
    kwargs = {k: v for k, v in SPARK_DEFAULT_KWARGS.get(model_name, {}).items() if k != 'drop_path_rate'}
    if dp:
        kwargs['drop_path_rate'] = dp
    cnn = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool='', **kwargs)
    try:
        encoder = SparseEncoder(cnn, input_size, sbn=sbn)
    except TypeError as e:
        raise ValueError(f'--model={model_name}: {e}. SparK-ready: {", ".join(SPARK_MODELS)}') from None
    decoder = LightDecoder(encoder.get_downsample_ratio(), width=decoder_width, sbn=sbn)
    return SparK(encoder, decoder, mask_ratio=mask_ratio, densify_norm=densify_norm_of(model_name), sbn=sbn)


def encoder_state_dict(spark, official=False):
    """Encoder weights (detached clones) in timm key layout, as `<model>_1kpretrained.pth` holds, or with
    official=True in the official model's (`<model>_1kpretrained_timm_style.pth`; FB names for ConvNeXts)."""
    state = {k: v.detach().clone() for k, v in spark.sparse_encoder.sp_cnn.state_dict().items()}
    return convnext_timm_to_official(state) if official and spark.official_convnext else state
