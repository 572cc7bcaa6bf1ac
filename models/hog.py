"""Histogram-of-oriented-gradients targets for LocalMIM (the official `HOGLayer`).

Per colour channel: Sobel gradients (reflect padding), hard assignment of the unsigned orientation
atan2(gx, gy) to `nbins` bins over [0, pi), a magnitude-weighted histogram averaged over square
cells, L2-normalised per cell. The three channels' histograms are concatenated [R | G | B].
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HOGLayer(nn.Module):
    def __init__(self, nbins=9, pool=8, bias=False, max_angle=math.pi):
        super().__init__()
        self.nbins = nbins
        self.pool = pool
        self.max_angle = max_angle
        # Frozen Sobel filters; with bias=True the bias keeps nn.Conv2d's random default init
        # (U(-1/3, 1/3)) exactly as the official code does, and is saved in checkpoints.
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1, padding_mode='reflect', bias=bias)
        sobel_x = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1))
        self.conv.requires_grad_(False)

    @torch.no_grad()
    def histogram(self, x):
        """[B, C, H, W] -> per-pixel histograms [B * C, nbins, H, W] (magnitude in the pixel's bin)."""
        b, c, h, w = x.shape
        grad = self.conv(x.reshape(b * c, 1, h, w))
        magnitude = torch.hypot(grad[:, 0:1], grad[:, 1:2])  # = the 2-norm over the pair; much faster on CPU
        phase = torch.atan2(grad[:, 0:1], grad[:, 1:2])
        bins = torch.remainder(torch.floor(phase / self.max_angle * self.nbins), self.nbins).long()
        hist = torch.zeros(b * c, self.nbins, h, w, dtype=magnitude.dtype, device=x.device)
        return hist.scatter_(1, bins, magnitude)

    @torch.no_grad()
    def forward(self, x, out_size=None, hist=None):
        """[B, C, H, W] -> [B, C * nbins, H / pool, W / pool] (or `out_size` cells when given).
        `hist`: this image's `histogram`, when already computed by a layer with the same filters."""
        b, c, h, w = x.shape
        hist = self.histogram(x) if hist is None else hist
        if out_size is None or out_size == (h // self.pool, w // self.pool):
            hist = F.avg_pool2d(hist, self.pool, self.pool)
        else:  # cells of a non-integer size (e.g. ViT-H/14 at 224 px): average adaptive windows
            hist = F.adaptive_avg_pool2d(hist, out_size)
        hist = F.normalize(hist, p=2, dim=1)
        return hist.reshape(b, c * self.nbins, *hist.shape[-2:])
