"""Pictures of SparK reconstructions: for a few fixed images under a fixed mask, one row per image with
the input, the masked input and the reconstruction (visible patches pasted from the input).

Take util.data.vis_batch.fixed_vis_batch for the images and `SparK.mask(n, device, generator)` with a
seeded generator for the mask once before training; pictures of different epochs then compare directly.
"""
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid


def denormalize(bchw):
    mean = bchw.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = bchw.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (bchw * std + mean).clamp(0, 1)


@torch.no_grad()
def spark_figure(model, imgs, active_b1ff):
    """[3, H', W'] grid in [0, 1]: rows = images, columns = input | masked input | reconstruction.
    Runs the model in eval mode (BN running statistics; no batch statistic is updated)."""
    was_training = model.training
    model.eval()
    try:
        inp, masked, rec = model(imgs, active_b1ff=active_b1ff, vis=True)
    finally:
        model.train(was_training)
    tiles = torch.stack([denormalize(t.float()) for t in (inp, masked, rec)], dim=1).flatten(0, 1)
    return make_grid(tiles.cpu(), nrow=3, padding=2, pad_value=1.0)


def save_spark_pictures(model, imgs, active_b1ff, out_dir, epoch, log_writer=None):
    """Writes out_dir/vis/epoch{epoch:04d}.png (and the TensorBoard image 'spark/reconstruction'); returns the path."""
    grid = spark_figure(model, imgs, active_b1ff)
    vis_dir = Path(out_dir) / 'vis'
    vis_dir.mkdir(parents=True, exist_ok=True)
    path = vis_dir / f'epoch{epoch:04d}.png'
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)
    if log_writer is not None:
        log_writer.add_image('spark/reconstruction', grid, epoch)
    return path
