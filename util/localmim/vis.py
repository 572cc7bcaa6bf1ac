"""Pictures of what LocalMIM learns: for a few fixed images under a fixed mask, the input, the masked
input, and the HOG target and prediction of every scale, drawn as oriented-line glyphs.

Take util.data.vis_batch.fixed_vis_batch once before training, then call `save_mim_pictures` every few
epochs; with the same images and mask every time, pictures of different epochs compare side by side.
"""
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid


@functools.lru_cache(maxsize=16)
def glyph_bank(nbins, cell_px):
    """[nbins, 1, cell_px, cell_px] anti-aliased lines through the cell centre, one per bin.

    HOGLayer's angle is atan2(gx, gy) with gx = left - right = -dI/dx and gy = top - bottom = -dI/dy,
    so angle t means a gradient along (x, y) = (sin t, cos t) (y pointing down); the edge runs across
    it, along (cos t, -sin t): t = 0 (horizontal edge) -> horizontal line, t = pi/2 -> vertical line.
    """
    c = (cell_px - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(cell_px) - c, torch.arange(cell_px) - c, indexing='ij')
    t = ((torch.arange(nbins) + 0.5) * math.pi / nbins).view(-1, 1, 1)
    dx, dy = t.cos(), -t.sin()
    along, across = xs * dx + ys * dy, xs * dy - ys * dx
    half = max(cell_px / 2 - 1, 0.5)
    lines = (1 - across.abs()).clamp(min=0) * (half + 0.5 - along.abs()).clamp(0, 1)
    return lines.unsqueeze(1)


def render_hog(hist, nbins, cell_px=12):
    """HOG histograms -> [B, 1, h * cell_px, w * cell_px] glyph image in [0, 1].

    `hist` is [B, h * w, C * nbins] (row-major square grid of cells, as `model.predict` returns) or
    [B, C * nbins, h, w]; the C colour histograms are summed, negatives clipped, and each image
    scaled by its largest bin.
    """
    if hist.dim() == 3:
        b, n, ch = hist.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f'{n} cells do not form a square grid; pass [B, C, h, w]')
        hist = hist.transpose(1, 2).reshape(b, ch, side, side)
    b, ch, h, w = hist.shape
    mag = hist.detach().float().reshape(b, ch // nbins, nbins, h, w).sum(1).clamp(min=0)
    mag = mag / mag.flatten(1).amax(1).clamp(min=1e-12).view(b, 1, 1, 1)
    return F.conv_transpose2d(mag, glyph_bank(nbins, cell_px).to(mag), stride=cell_px).clamp(0, 1)


@torch.no_grad()
def mim_figure(model, imgs, noise, mask_ratio=0.75, min_cell_px=6):
    """{'scale4': [3, H', W'], ...}: per scale, one row per image with the input, the masked input
    (grey = masked patch), the HOG target and the predicted HOG, all in [0, 1].

    `model` is the bare MaskedAutoencoderViT (not a DDP wrapper). Panels are the input's size, except
    that HOG cells are drawn at least `min_cell_px` pixels wide (then every panel is enlarged).
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        mask, outputs = model.predict(imgs.to(device), mask_ratio, noise.to(device))
    finally:
        model.train(was_training)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    rgb = (imgs.detach().float().cpu() * std + mean).clamp(0, 1)
    b, _, H, W = rgb.shape
    g = model.grid_size
    pix_mask = F.interpolate(mask.float().cpu().view(b, 1, g, g), size=(H, W), mode='nearest')
    masked = rgb * (1 - pix_mask) + 0.5 * pix_mask
    figures = {}
    for k, (s, output) in enumerate(zip(model.scale, outputs)):
        if output is None:  # stage skipped by FreezeOut
            continue
        pred, target, _ = output
        h, w = model.target_grid(k)
        cell = max(min_cell_px, math.ceil(H / h), math.ceil(W / w))
        hogs = [render_hog(x.cpu(), model.hog_nbins, cell).expand(-1, 3, -1, -1) for x in (target, pred)]
        size = (h * cell, w * cell) if min_cell_px * h > H or min_cell_px * w > W else (H, W)
        panels = [F.interpolate(x, size=size, mode='nearest') for x in (rgb, masked, *hogs)]
        tiles = torch.stack(panels, 1).flatten(0, 1)  # row-major: image i's 4 panels, then image i+1
        figures[f'scale{s:g}'] = make_grid(tiles, nrow=4, padding=2, pad_value=1.0)
    return figures


def save_mim_pictures(model, imgs, noise, out_dir, epoch, log_writer=None):
    """Writes out_dir/vis/epoch{epoch:04d}_scale{s}.png per scale (and TensorBoard images 'mim/scale{s}'
    when `log_writer` is a SummaryWriter); returns the written paths."""
    vis_dir = Path(out_dir) / 'vis'
    vis_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, grid in mim_figure(model, imgs, noise).items():
        path = vis_dir / f'epoch{epoch:04d}_{key}.png'
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)
        if log_writer is not None:
            log_writer.add_image(f'mim/{key}', grid, epoch)
        paths.append(path)
    return paths
