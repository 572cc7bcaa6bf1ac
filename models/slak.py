"""SLaK (Sparse Large Kernel ConvNeXt, ICLR 2023) in plain PyTorch, registered with timm
(https://github.com/VITA-Group/SLaK).

Official factory names, constructor arguments and state-dict keys. Differences from the official code: plain
PyTorch depthwise convs, padding (kh//2, kw//2), exact faster routes (`conv_impl`: crop / FFT); nn.BatchNorm2d
instead of SyncBatchNorm (convert for multi-GPU runs); `reparameterize()` also merges Decom branches; old
Decom1/Decom2 checkpoint keys load."""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model

from models.factory import model_kwargs
from models.grad_ckpt import checkpointed
from models.layers import LayerNorm2d

CONV_IMPLS = ('auto', 'dense', 'crop', 'fft')
OLD_BRANCH_NAMES = {'Decom1': 'LoRA1', 'Decom2': 'LoRA2'}  # names of checkpoints from 2022-07-07..12


# ---------------------------------------------------------------- depthwise convolution routes

def crop_kernel(weight, h, w):
    """The central part of a (C,1,kh,kw) kernel that a same-padded conv on an h x w map can reach."""
    kh, kw = weight.shape[-2:]
    ch, cw = min(kh, 2 * h - 1), min(kw, 2 * w - 1)
    top, left = (kh - ch) // 2, (kw - cw) // 2
    return weight[..., top:top + ch, left:left + cw]


def _fft_len(n):
    """Smallest n' >= n whose only prime factors are 2, 3, 5, 7 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _fft_convs(x, weights):
    """Same-padded depthwise cross-correlations by FFT, one forward transform of x for all kernels.

    Circular correlation equals the zero-padded one when the transform is at least h + kh//2 long: the
    taps that wrap around past either edge then land in the zero padding only.
    """
    h, w = x.shape[-2:]
    n_h = _fft_len(h + max(k.shape[-2] for k in weights) // 2)
    n_w = _fft_len(w + max(k.shape[-1] for k in weights) // 2)
    dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision FFTs: CUDA and powers of 2 only
    x_f = torch.fft.rfft2(x.to(dtype), s=(n_h, n_w))
    outs = []
    for k in weights:
        kh, kw = k.shape[-2:]
        k = F.pad(k[:, 0].to(dtype), (0, n_w - kw, 0, n_h - kh))
        k_f = torch.fft.rfft2(torch.roll(k, (-(kh // 2), -(kw // 2)), (1, 2)))  # tap (kh//2, kw//2) -> (0, 0)
        outs.append(torch.fft.irfft2(x_f * k_f.conj(), s=(n_h, n_w))[..., :h, :w].to(x.dtype))
    return outs


def depthwise_convs(x, weights, impl='crop'):
    """Stride-1 depthwise convs of x (N,C,H,W) with each (C,1,kh,kw) kernel (odd sizes), padding (kh//2, kw//2).

    impl 'dense': F.conv2d on the full kernel; 'crop': F.conv2d on the kernel cropped to what the map can
    reach; 'fft': cropped kernels by FFT. All three give the same result up to float rounding.
    """
    h, w = x.shape[-2:]
    if impl != 'dense':
        weights = [crop_kernel(k, h, w) for k in weights]
    if impl == 'fft':
        return _fft_convs(x, weights)
    if impl not in ('dense', 'crop'):
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
    return [F.conv2d(x, k, padding=(k.shape[-2] // 2, k.shape[-1] // 2), groups=x.shape[1]) for k in weights]


def auto_impl(x, kernel_sizes, training):
    """The fastest exact route found by bench/bench_slak.py: on CPU FFT once the cropped kernels have many
    taps (SLaK-T stages 1-2, and stage 3 at inference), else crop; on CUDA crop (not yet measured there)."""
    h, w = x.shape[-2:]
    taps = sum(min(kh, 2 * h - 1) * min(kw, 2 * w - 1) for kh, kw in kernel_sizes)
    if x.device.type == 'cpu' and taps >= (300 if training else 200):
        return 'fft'
    return 'crop'


# ---------------------------------------------------------------- blocks

def conv_bn(channels, kernel_size, bn=True):
    """Depthwise conv (no bias) [+ BN] with the official child names `conv`, `bn`."""
    layers = [('conv', nn.Conv2d(channels, channels, kernel_size, padding=(kernel_size[0] // 2, kernel_size[1] // 2),
                                 groups=channels, bias=False))]
    if bn:
        layers.append(('bn', nn.BatchNorm2d(channels)))
    return nn.Sequential(OrderedDict(layers))


def fuse_bn(conv_bn_seq):
    """(kernel, bias) of a conv_bn with its BN (running statistics) folded in."""
    kernel = conv_bn_seq.conv.weight
    if not hasattr(conv_bn_seq, 'bn'):
        return kernel, kernel.new_zeros(kernel.shape[0])
    bn = conv_bn_seq.bn
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def rename_old_keys(state_dict):
    """A copy of a SLaK state dict with the 2022-07 branch names Decom1/Decom2 renamed to LoRA1/LoRA2."""
    def rename(key):
        parts = key.split('.')
        return '.'.join(OLD_BRANCH_NAMES.get(p, p) if i and parts[i - 1] == 'large_kernel' else p
                        for i, p in enumerate(parts))
    return OrderedDict((rename(k), v) for k, v in state_dict.items())


class ReparamLargeKernelConv(nn.Module):
    """Sum of depthwise branches, each with its own BN: K x k + k x K (+ k x k) with Decom, else K x K (+ k x k).

    The k x k `small_conv` exists only when small_kernel < kernel_size. After `reparameterize()` one K x K
    conv with bias (`lkb_reparam`) replaces the branches.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=None, small_kernel=5,
                 small_kernel_merged=False, Decom=False, bn=True, conv_impl='auto'):
        super().__init__()
        if not (in_channels == out_channels == (groups or in_channels)) or stride != 1:
            raise ValueError('ReparamLargeKernelConv is depthwise with stride 1 only')
        big, small = kernel_size, small_kernel
        sizes = [(big, small), (small, big)] if Decom else [(big, big)]
        if small is not None and small < big:
            sizes.append((small, small))
        even = sorted({s for hw in sizes for s in hw if s % 2 == 0})
        if even:
            raise ValueError(f'kernel sizes must be odd for same padding, got {even} in kernel_size '
                             f'({big}, {small}) (--kernel_size)')
        self.kernel_size, self.small_kernel, self.Decom, self.bn = big, small, bool(Decom), bn
        self.conv_impl = conv_impl
        if Decom:
            self.LoRA1 = conv_bn(in_channels, (big, small), bn)
            self.LoRA2 = conv_bn(in_channels, (small, big), bn)
        else:
            self.lkb_origin = conv_bn(in_channels, (big, big), bn)
        if small is not None and small < big:
            self.small_conv = conv_bn(in_channels, (small, small), bn)
        self._register_load_state_dict_pre_hook(self._rename_old_keys)
        if small_kernel_merged:
            self.reparameterize()

    @staticmethod
    def _rename_old_keys(state_dict, prefix, *args):
        for old, new in OLD_BRANCH_NAMES.items():
            for key in [k for k in state_dict if k.startswith(prefix + old + '.')]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)

    def branches(self):
        return [getattr(self, n) for n in ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv') if hasattr(self, n)]

    def get_equivalent_kernel_bias(self):
        """One kernel and bias equal to the sum of the branches with BN in eval mode (zero-padded to the centre)."""
        if hasattr(self, 'lkb_reparam'):
            return self.lkb_reparam.weight, self.lkb_reparam.bias
        fused = [fuse_bn(b) for b in self.branches()]
        kh = max(k.shape[-2] for k, _ in fused)
        kw = max(k.shape[-1] for k, _ in fused)
        kernel = sum(F.pad(k, [(kw - k.shape[-1]) // 2] * 2 + [(kh - k.shape[-2]) // 2] * 2) for k, _ in fused)
        return kernel, sum(b for _, b in fused)

    @torch.no_grad()
    def reparameterize(self):
        """Replace the branches by `lkb_reparam` (inference; uses the BN running statistics)."""
        if hasattr(self, 'lkb_reparam'):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        c, _, kh, kw = kernel.shape
        self.lkb_reparam = nn.Conv2d(c, c, (kh, kw), padding=(kh // 2, kw // 2), groups=c, bias=True,
                                     device=kernel.device, dtype=kernel.dtype)
        self.lkb_reparam.weight.copy_(kernel)
        self.lkb_reparam.bias.copy_(bias)
        for name in ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv'):
            if hasattr(self, name):
                delattr(self, name)

    def resolve_impl(self, x):
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}')
        if self.conv_impl != 'auto':
            return self.conv_impl
        convs = [self.lkb_reparam] if hasattr(self, 'lkb_reparam') else [b.conv for b in self.branches()]
        sizes = [c.weight.shape[-2:] for c in convs]
        return auto_impl(x, sizes, self.training)

    def forward(self, x):
        impl = self.resolve_impl(x)
        # Folding BN into one kernel is exact unless BN uses batch statistics; by FFT it saves two inverse FFTs
        if hasattr(self, 'lkb_reparam') or (impl == 'fft' and not (self.training and self.bn)):
            kernel, bias = self.get_equivalent_kernel_bias()
            return depthwise_convs(x, [kernel], impl)[0] + bias.view(1, -1, 1, 1).to(x.dtype)
        branches = self.branches()
        outs = depthwise_convs(x, [b.conv.weight for b in branches], impl)
        return sum(b.bn(o) if self.bn else o for b, o in zip(branches, outs))


class Block(nn.Module):
    """Large-kernel unit -> LN -> Linear 4x -> GELU -> Linear -> layer scale -> drop path, residual."""

    def __init__(self, dim, drop_path=0., layer_scale_init_value=1e-6, kernel_size=(51, 5), Decom=None, bn=True,
                 conv_impl='auto'):
        super().__init__()
        self.large_kernel = ReparamLargeKernelConv(dim, dim, kernel_size[0], groups=dim, small_kernel=kernel_size[1],
                                                   Decom=Decom, bn=bn, conv_impl=conv_impl)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- network

class SLaK(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0., layer_scale_init_value=1e-6, head_init_scale=1., kernel_size=(51, 49, 47, 13, 5),
                 width_factor=1.0, Decom=None, bn=True, conv_impl='auto'):
        super().__init__()
        kernel_size = list(kernel_size)
        if len(kernel_size) != 5 or not all(isinstance(k, int) and k > 0 for k in kernel_size):
            raise ValueError('kernel_size (--kernel_size) must be 5 positive ints: the large kernel of each of the '
                             f'4 stages, then the small/strip size, e.g. 51 49 47 13 5; got {kernel_size}')
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f'depths and dims need 4 entries, got {depths} and {dims}')
        dims = [int(d * width_factor) for d in dims]
        self.dims, self.num_classes = dims, num_classes
        self.grad_checkpointing = False
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4),
                                                              LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i]),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dims[i], rates[first + j], layer_scale_init_value, (kernel_size[i], kernel_size[-1]), Decom, bn,
                      conv_impl) for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in the backward pass (timm's convention): less memory for about a
        third more compute; BatchNorm running statistics are updated once, as without it."""
        self.grad_checkpointing = enable

    def forward_features(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            if self.grad_checkpointing:
                for block in stage:
                    x = checkpointed(block, x)
            else:
                x = stage(x)
        return self.norm(x.mean([-2, -1]))

    def forward(self, x):
        return self.head(self.forward_features(x))

    def set_conv_impl(self, conv_impl):
        return set_conv_impl(self, conv_impl)

    def reparameterize(self):
        return reparameterize(self)


def set_conv_impl(module, conv_impl):
    """Switch every large-kernel unit in module to 'auto', 'dense', 'crop' or 'fft' (parameters unchanged)."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
    for m in module.modules():
        if isinstance(m, ReparamLargeKernelConv):
            m.conv_impl = conv_impl
    return module


def reparameterize(module):
    """Merge every large-kernel unit in module into one conv for inference (keys become lkb_reparam)."""
    for m in module.modules():
        if isinstance(m, ReparamLargeKernelConv):
            m.reparameterize()
    return module


def _create(pretrained, depths, dims, **kwargs):
    kwargs = model_kwargs(pretrained, kwargs, 'load an official SLaK checkpoint with --resume or --finetune')
    return SLaK(depths=depths, dims=dims, **kwargs)


@register_model
def SLaK_tiny(pretrained=False, **kwargs):
    return _create(pretrained, [3, 3, 9, 3], [96, 192, 384, 768], **kwargs)


@register_model
def SLaK_small(pretrained=False, **kwargs):
    return _create(pretrained, [3, 3, 27, 3], [96, 192, 384, 768], **kwargs)


@register_model
def SLaK_base(pretrained=False, **kwargs):
    return _create(pretrained, [3, 3, 27, 3], [128, 256, 512, 1024], **kwargs)


@register_model
def SLaK_large(pretrained=False, **kwargs):
    return _create(pretrained, [3, 3, 27, 3], [192, 384, 768, 1536], **kwargs)
