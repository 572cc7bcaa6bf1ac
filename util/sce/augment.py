"""GPU batch video augmentation of SCE: the two asymmetric pipelines of the official SCE run.

One call augments a batch of clips [B, 3, T, H, W] (values 0..255) on the clips' own device, with random
parameters drawn per clip and shared by its T frames: /255, colour jitter (p 0.8), grayscale (p 0.2),
Gaussian blur (kernel 23; p 1.0 in pipeline 0, 0.1 in pipeline 1), solarize (pipeline 1 only, p 0.2),
horizontal flip (p 0.5), then normalisation with mean 0.45 and std 0.225.

It re-implements the torchaug 0.3.3 batch transforms of the official eztorch config in plain torch: the
clips an op touches are counted (floor or ceil of p * B, see `select`) and the order of the four jitter ops
is random per chunk of clips (`jitter_orders`). Random numbers are drawn on the CPU and copied to the
device: no host-device sync, and one RNG seed gives the same augmentation on CPU and CUDA. kornia is not used:
its colour jitter has other formulas and one op order per batch.
"""
import math
from itertools import permutations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
JITTER_ORDERS = torch.tensor(list(permutations(range(4))))  # [24, 4]; 0 b, 1 c, 2 s, 3 h
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')

# The two pipelines of the official config; everything else is shared (see SCEVideoAugment defaults).
PIPELINES = {0: dict(blur_p=1.0, solarize_p=0.0), 1: dict(blur_p=0.1, solarize_p=0.2)}


# ----------------------------------------------------------------------------- kernels
# All take x [n, 3, T, H, W] float and per-clip factors [n] on x's device.

def _per_clip(f, x):
    return f.to(x.dtype).view(-1, *[1] * (x.ndim - 1))


def grayscale(x):
    """[n, 1, T, H, W] luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x, f):
    return (x * _per_clip(f, x)).clamp_(0, 1)


def adjust_contrast(x, f):
    mean = grayscale(x).mean(dim=(1, 3, 4), keepdim=True)  # per clip and frame, like torchaug
    f = _per_clip(f, x)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x, f):
    f = _per_clip(f, x)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def rgb_to_hsv(x):
    """(h, s, v), each [n, T, H, W], h and s in [0, 1] (torchvision's HSV)."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, 1.0, maxc)
    d = torch.where(flat, 1.0, delta)
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    return h.div_(6).remainder_(1), s, maxc


def hsv_to_rgb(h, s, v):
    """[n, 3, T, H, W]; channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6h) mod 6."""
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1, 1)
    k = (6 * h).unsqueeze(1).add(n).remainder_(6)
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    v = v.unsqueeze(1)
    return v - k.mul_(v * s.unsqueeze(1))


def adjust_hue(x, f):
    h, s, v = rgb_to_hsv(x.clamp(0, 1))  # identity on valid input; no NaN from negative values
    return hsv_to_rgb(h.add_(_per_clip(f, h)).remainder_(1), s, v)


def gaussian_kernel1d(sigma, kernel_size):
    """[n, K] normalised kernels exp(-k^2 / (2 sigma^2)), k = -(K-1)/2..(K-1)/2."""
    k = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device) - (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (k / sigma[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(x, sigma, kernel_size=23):
    """Separable blur of every frame and channel, one sigma per clip, reflect padding."""
    n, c, t, h, w = x.shape
    r = kernel_size // 2
    kern = gaussian_kernel1d(sigma.to(x.dtype), kernel_size).repeat_interleave(c * t, 0)
    planes = F.pad(x.reshape(1, n * c * t, h, w), (r, r, r, r), mode='reflect')
    planes = F.conv2d(planes, kern.view(-1, 1, 1, kernel_size), groups=n * c * t)  # along W
    planes = F.conv2d(planes, kern.view(-1, 1, kernel_size, 1), groups=n * c * t)  # along H
    return planes.view(n, c, t, h, w)


def solarize(x, threshold):
    return torch.where(x >= threshold, 1 - x, x)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ----------------------------------------------------------------------------- sampling

def _range(value, name, center=1.0, bound=None):
    """torchvision ColorJitter convention: v -> [max(0, c - v), c + v], or an explicit (lo, hi)."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f'{name} must be non-negative, got {value}')
        lo, hi = center - value, center + value
        if center == 1.0:
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not lo <= hi or (bound is not None and not bound[0] <= lo <= hi <= bound[1]):
        raise ValueError(f'{name} range {(lo, hi)} is invalid')
    return None if lo == hi == center else (lo, hi)


def _uniform(n, lo_hi, g):
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g)


def select(p, batch_size, generator=None, mode='count'):
    """bool[B]: which clips an op with probability p touches.

    'count' (torchaug): floor(p*B) or ceil(p*B) clips, ceil with probability frac(p*B), chosen by
    randperm, so each clip is hit with probability exactly p. 'iid': one coin per clip.
    """
    if mode == 'iid':
        return torch.rand(batch_size, generator=generator) < p
    mask = torch.zeros(batch_size, dtype=torch.bool)
    if p <= 0:
        return mask
    if p >= 1:
        return mask.fill_(True)
    x = p * batch_size
    num = math.floor(x) + int(torch.rand(1, generator=generator).item() < x - math.floor(x))
    mask[torch.randperm(batch_size, generator=generator)[:num]] = True
    return mask


def jitter_orders(mask, generator=None):
    """long[B, 4]: the order of the 4 jitter ops per clip (rows of unselected clips are arbitrary).

    torchaug 0.3.3: the n selected clips are shuffled and cut into chunks of ceil(n / min(n, 24));
    chunk i gets the i-th of min(n, 24) distinct orders drawn by randperm(24).
    """
    orders = JITTER_ORDERS[0].repeat(mask.numel(), 1)
    idx = mask.nonzero().squeeze(1)
    n = idx.numel()
    if n:
        k = min(n, len(JITTER_ORDERS))
        chosen = torch.randperm(len(JITTER_ORDERS), generator=generator)[:k]
        chunk = math.ceil(n / k)
        shuffled = idx[torch.randperm(n, generator=generator)]
        orders[shuffled] = JITTER_ORDERS[chosen[torch.arange(n) // chunk]]
    return orders


# ----------------------------------------------------------------------------- pipeline

class SCEVideoAugment(nn.Module):
    """One of the two SCE GPU pipelines; `pipeline` picks the official config's blur / solarize
    probabilities.

    call(clips [B, 3, T, H, W] uint8 or float 0..255, generator=None) -> float32 clips, normalised,
    on the clips' device. `generator` is a CPU torch.Generator (parameters are drawn on the CPU).
    The parameters of the last call are kept in `last_params` (CPU tensors, one entry per clip);
    `apply(clips, params)` replays given parameters. Reflect padding of the blur needs H, W > 11.
    """

    def __init__(self, pipeline=0, *, brightness=0.8, contrast=0.8, saturation=0.4, hue=0.2,
                 jitter_p=0.8, grayscale_p=0.2, blur_kernel=23, blur_sigma=(0.1, 2.0), blur_p=None,
                 solarize_threshold=0.5, solarize_p=None, hflip_p=0.5,
                 mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), selection='count'):
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f'pipeline must be 0 or 1, got {pipeline}')
        if blur_kernel % 2 != 1:
            raise ValueError(f'blur_kernel must be odd, got {blur_kernel}')
        if selection not in ('count', 'iid'):
            raise ValueError(f"selection must be 'count' or 'iid', got {selection!r}")
        self.pipeline = pipeline
        self.jitter = {'brightness': _range(brightness, 'brightness'),
                       'contrast': _range(contrast, 'contrast'),
                       'saturation': _range(saturation, 'saturation'),
                       'hue': _range(hue, 'hue', center=0.0, bound=(-0.5, 0.5))}
        self.jitter_p, self.grayscale_p, self.hflip_p = jitter_p, grayscale_p, hflip_p
        self.blur_kernel, self.blur_sigma = blur_kernel, tuple(blur_sigma)
        self.blur_p = PIPELINES[pipeline]['blur_p'] if blur_p is None else blur_p
        self.solarize_threshold = solarize_threshold
        self.solarize_p = PIPELINES[pipeline]['solarize_p'] if solarize_p is None else solarize_p
        self.mean, self.std = tuple(mean), tuple(std)
        self.selection = selection
        self.last_params = None

    def extra_repr(self):
        return (f'pipeline={self.pipeline}, jitter={self.jitter}, jitter_p={self.jitter_p}, '
                f'grayscale_p={self.grayscale_p}, blur=(k {self.blur_kernel}, sigma '
                f'{self.blur_sigma}, p {self.blur_p}), solarize=(t {self.solarize_threshold}, '
                f'p {self.solarize_p}), hflip_p={self.hflip_p}, mean={self.mean}, std={self.std}, '
                f'selection={self.selection}')

    def sample_params(self, batch_size, generator=None):
        """Per-clip parameters: masks bool[B] and factors float[B] (all on the CPU)."""
        if generator is not None and generator.device.type != 'cpu':
            raise ValueError('generator must be a CPU torch.Generator')
        g, B, mode = generator, batch_size, self.selection
        params = {'jitter': select(self.jitter_p, B, g, mode)}
        params['jitter_order'] = jitter_orders(params['jitter'], g)
        for name in JITTER_OPS:
            rng = self.jitter[name]
            params[name] = None if rng is None else _uniform(B, rng, g)
        params['grayscale'] = select(self.grayscale_p, B, g, mode)
        params['blur'] = select(self.blur_p, B, g, mode)
        params['sigma'] = _uniform(B, self.blur_sigma, g)
        params['solarize'] = select(self.solarize_p, B, g, mode)
        params['hflip'] = select(self.hflip_p, B, g, mode)
        return params

    @torch.no_grad()
    def apply(self, clips, params):
        """Augment clips with given parameters (as returned by `sample_params`)."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f'expected clips [B, 3, T, H, W], got {tuple(clips.shape)}')
        with torch.autocast(clips.device.type, enabled=False):
            x = clips.to(torch.float32) / 255  # Div255: no clamp, as in eztorch
            for step in range(4):  # jitter: at each step, every clip runs the op of its order
                for op, fn in enumerate(_JITTER_FNS):
                    factor = params[JITTER_OPS[op]]
                    if factor is not None:
                        mask = params['jitter'] & (params['jitter_order'][:, step] == op)
                        x = _apply_on(x, mask, fn, factor)
            x = _apply_on(x, params['grayscale'], lambda v: grayscale(v).repeat(1, 3, 1, 1, 1))
            x = _apply_on(x, params['blur'], gaussian_blur, params['sigma'], self.blur_kernel)
            x = _apply_on(x, params['solarize'], solarize, self.solarize_threshold)
            x = _apply_on(x, params['hflip'], lambda v: v.flip(-1))
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1, 1)
            return (x - mean) / std

    def forward(self, clips, generator=None):
        self.last_params = self.sample_params(clips.shape[0], generator)
        return self.apply(clips, self.last_params)


def _apply_on(x, mask, fn, *args):
    """x with fn applied to the clips of the CPU mask; per-clip tensor args are indexed alike."""
    if not mask.any():
        return x
    if mask.all():
        return fn(x, *[a.to(x.device) if torch.is_tensor(a) else a for a in args])
    idx = mask.nonzero().squeeze(1)
    args = [a[idx].to(x.device) if torch.is_tensor(a) else a for a in args]
    idx = idx.to(x.device)
    x[idx] = fn(x[idx], *args)
    return x


def build_sce_augmentations(pipeline0=None, pipeline1=None, **overrides):
    """[pipeline 0, pipeline 1] of the official config; `overrides` go to both, `pipelineN` dicts to one.

    E.g. the baseline config: build_sce_augmentations(brightness=0.4, contrast=0.4,
    saturation=0.2, hue=0.1).
    """
    return [SCEVideoAugment(i, **{**overrides, **(extra or {})})
            for i, extra in enumerate((pipeline0, pipeline1))]


@torch.no_grad()
def clip_pair_grid(view0, view1, n=4, frames=1, mean=0.45, std=0.225):
    """Image grid [3, H', W'] in [0, 1] for TensorBoard: one row per clip (the first n), showing
    `frames` evenly spaced frames of view 0 and then of view 1 (frames=1: the middle frame),
    de-normalised."""
    t = view0.shape[2]
    ts = torch.linspace(0, t - 1, frames + 2)[1:-1] if frames == 1 else \
        torch.linspace(0, t - 1, frames)
    ts = ts.round().long()
    views = [v[:n].detach().float().cpu()[:, :, ts].transpose(1, 2) for v in (view0, view1)]
    tiles = (torch.cat(views, 1) * std + mean).clamp_(0, 1)  # [n, 2 * frames, 3, H, W]
    return make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2, pad_value=1.0)
