"""Tests for util/localmim/vis.py: HOG glyph orientation, tiny-model figures, saved pictures, fixed batch."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  (registers MIM_vit_* with timm)
from models.hog import HOGLayer
from util.data.datasets import ImageFolderOrFlat, build_pretrain_transform
from util.data.vis_batch import fixed_vis_batch, vis_transform
from util.localmim.vis import mim_figure, render_hog, save_mim_pictures

CELL = 12


def rendered_cell(img, row, col, nbins=9, pool=8):
    """The glyph drawn for HOG cell (row, col) of a synthetic [3, H, W] image, via the real HOGLayer."""
    hist = HOGLayer(nbins, pool)(img.unsqueeze(0))  # [1, 3 * nbins, H / pool, W / pool]
    out = render_hog(hist, nbins, CELL)
    assert out.shape == (1, 1, hist.shape[2] * CELL, hist.shape[3] * CELL)
    return out[0, 0, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


def moments(patch):
    """Brightness-weighted (var_x, var_y, cov_xy) of a glyph, x to the right and y downwards."""
    ys, xs = torch.meshgrid(torch.arange(CELL).float(), torch.arange(CELL).float(), indexing='ij')
    w = patch / patch.sum()
    mx, my = (w * xs).sum(), (w * ys).sum()
    return ((w * (xs - mx) ** 2).sum().item(), (w * (ys - my) ** 2).sum().item(),
            (w * (xs - mx) * (ys - my)).sum().item())


def test_vertical_edge_draws_vertical_lines():
    img = torch.zeros(3, 32, 32)
    img[:, :, 16:] = 1  # dark left half, bright right half
    var_x, var_y, _ = moments(rendered_cell(img, 1, 1))
    assert var_y > 10 * var_x
    far = render_hog(HOGLayer(9, 8)(img.unsqueeze(0)), 9, CELL)[..., :CELL]
    assert far.max() == 0  # no gradient away from the edge, no glyph


def test_horizontal_edge_draws_horizontal_lines():
    img = torch.zeros(3, 32, 32)
    img[:, 16:, :] = 1
    var_x, var_y, _ = moments(rendered_cell(img, 2, 1))
    assert var_x > 10 * var_y


@pytest.mark.parametrize('bright_below', [True, False])
def test_diagonal_edge_draws_line_along_the_edge(bright_below):
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing='ij')
    img = ((xs + ys >= 32) == bright_below).float().expand(3, -1, -1)  # edge along '/' (x + y = 32)
    var_x, var_y, cov = moments(rendered_cell(img, 1, 2))
    assert cov < -0.8 * (var_x * var_y) ** 0.5  # y falls as x grows: a '/' line, not '\'


def test_render_hog_range_shape_and_layouts():
    torch.manual_seed(0)
    hist = torch.randn(2, 5 * 5, 3 * 9) * 4  # negatives and large values, as raw predictions are
    out = render_hog(hist, 9, cell_px=7)
    assert out.shape == (2, 1, 35, 35) and out.min() >= 0 and out.max() <= 1 and out.max() > 0.5
    grid_layout = hist.transpose(1, 2).reshape(2, 27, 5, 5)
    assert torch.equal(out, render_hog(grid_layout, 9, cell_px=7))
    assert render_hog(torch.zeros(1, 4, 27), 9).abs().sum() == 0


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return timm.create_model('MIM_vit_tiny_patch16', img_size=64)


def test_mim_figure_shapes_mask_and_mode(tiny):
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.arange(16.).repeat(2, 1)  # keeps patches 0-3 (the top patch row), masks the rest
    tiny.train()
    figs = mim_figure(tiny, imgs, noise)
    assert tiny.training
    assert list(figs) == ['scale4', 'scale2', 'scale1', 'scale0.5']
    # HOG cells drawn >= 6 px: scale 4 (16 cells) enlarges its panels to 96 px, the others keep 64 px
    for key, panel in [('scale4', 96), ('scale2', 64), ('scale1', 64), ('scale0.5', 64)]:
        fig = figs[key]
        assert fig.shape == (3, 2 * (panel + 2) + 2, 4 * (panel + 2) + 2), key
        assert fig.dtype == torch.float32 and fig.min() >= 0 and fig.max() <= 1
    fig = figs['scale1']
    x0 = 2 + 64 + 2  # second column: the masked input of image 0
    assert torch.all(fig[:, 2 + 16:2 + 64, x0:x0 + 64] == 0.5)
    assert torch.equal(fig[:, 2:2 + 16, x0:x0 + 64], fig[:, 2:2 + 16, 2:2 + 64])
    tiny.eval()
    again = mim_figure(tiny, imgs, noise)
    assert not tiny.training and all(torch.equal(figs[k], again[k]) for k in figs)


def test_save_mim_pictures_writes_pngs_and_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(tmp_path / 'tb'))
    paths = save_mim_pictures(tiny, torch.randn(1, 3, 64, 64), torch.rand(1, 16), tmp_path, 7, writer)
    writer.close()
    assert [p.name for p in paths] == [f'epoch0007_scale{s}.png' for s in ('4', '2', '1', '0.5')]
    assert all(p.parent == tmp_path / 'vis' and p.is_file() for p in paths)
    assert Image.open(paths[2]).size == (4 * 66 + 2, 66 + 2)
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert sorted(events.Tags()['images']) == sorted(f'mim/scale{s}' for s in ('4', '2', '1', '0.5'))
    assert events.Images('mim/scale1')[0].step == 7
    assert save_mim_pictures(tiny, torch.randn(1, 3, 64, 64), torch.rand(1, 16), tmp_path, 8)[0].is_file()


def test_fixed_vis_batch_is_fixed_and_leaves_global_rng_alone(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    dataset = ImageFolderOrFlat(tmp_path, transform=build_pretrain_transform(32))
    fixed = ImageFolderOrFlat(tmp_path, transform=vis_transform(32))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    imgs, noise = fixed_vis_batch(fixed, n=3, seed=0, num_patches=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert imgs.shape == (3, 3, 32, 32) and noise.shape == (3, 4)
    expected = vis_transform(32)(Image.open(tmp_path / '2.png').convert('RGB'))  # indices 0, 2, 4
    assert torch.equal(imgs[1], expected)
    imgs2, noise2 = fixed_vis_batch(fixed, n=3, seed=0, num_patches=4)
    assert torch.equal(imgs, imgs2) and torch.equal(noise, noise2)
    assert not torch.equal(noise, fixed_vis_batch(fixed, n=3, seed=1, num_patches=4)[1])
    # A random dataset transform still gives repeatable images, off the global RNG.
    random_a, _ = fixed_vis_batch(dataset, n=2, num_patches=4)
    random_b, _ = fixed_vis_batch(dataset, n=2, num_patches=4)
    assert torch.equal(random_a, random_b) and torch.equal(torch.get_rng_state(), state)
