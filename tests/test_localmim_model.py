"""LocalMIM model (models/localmim.py, models/hog.py): HOG targets, masks, loss and state-dict layout against the
official definitions."""
import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401  (registers MIM_vit_*)
from models.hog import HOGLayer
from models.localmim import MaskedAutoencoderViT


def numpy_hog(img, nbins, cell):
    """LocalMIM's HOG (Sobel gradients, orientation bins, cell means, L2 norm over the bins) of one [C, H, W] image,
    in float64 NumPy: [h * w, C * nbins]."""
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    ky = kx.T
    channels = []
    for ch in img.astype(np.float64):
        p = np.pad(ch, 1, mode='reflect')
        H, W = ch.shape
        gx = sum(kx[a, b] * p[a:a + H, b:b + W] for a in range(3) for b in range(3))
        gy = sum(ky[a, b] * p[a:a + H, b:b + W] for a in range(3) for b in range(3))
        mag = np.sqrt(gx ** 2 + gy ** 2)
        bins = np.mod(np.floor(np.arctan2(gx, gy) / np.pi * nbins), nbins).astype(int)
        hist = np.zeros((nbins, H, W))
        for b in range(nbins):
            hist[b][bins == b] = mag[bins == b]
        hist = hist.reshape(nbins, H // cell, cell, W // cell, cell).mean(axis=(2, 4))
        hist = hist / np.maximum(np.sqrt((hist ** 2).sum(0, keepdims=True)), 1e-12)
        channels.append(hist)
    out = np.concatenate(channels, 0)  # [C * nbins, h, w]
    return out.reshape(out.shape[0], -1).T


@pytest.mark.parametrize('nbins,cell', [(9, 4), (9, 8), (18, 16)])
def test_hog_matches_numpy_definition(nbins, cell):
    # Quarter-integer pixels keep the Sobel sums exact in float32, so a gradient that cancels to 0
    # (e.g. on a reflected border row) is exactly 0 in both versions instead of +-6e-8 round-off,
    # which would put it on either side of the 90-degree bin edge.
    torch.manual_seed(0)
    imgs = torch.randint(-8, 9, (2, 3, 32, 32)) / 4.0
    layer = HOGLayer(nbins=nbins, pool=cell)
    ours = layer(imgs).flatten(2).transpose(1, 2)
    for b in range(2):
        ref = numpy_hog(imgs[b].numpy(), nbins, cell)
        np.testing.assert_allclose(ours[b].numpy(), ref, atol=2e-5)


def test_model_hog_target_uses_cells_4_8_16_32():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64)
    imgs = torch.randint(-8, 9, (1, 3, 64, 64)) / 4.0
    for k, cell in enumerate([4, 8, 16, 32]):
        target = model.HOG(imgs, k)
        assert target.shape == (1, (64 // cell) ** 2, 27)
        np.testing.assert_allclose(target[0].numpy(), numpy_hog(imgs[0].numpy(), 9, cell), atol=2e-5)


def test_hog_bias_is_frozen_random_default_init():
    layer = HOGLayer(nbins=9, pool=8, bias=True)
    assert layer.conv.bias is not None and not layer.conv.bias.requires_grad
    assert layer.conv.bias.abs().max() <= 1 / 3 and layer.conv.bias.abs().sum() > 0


def test_masked_loss_by_hand():
    pred = torch.tensor([[[1., 2.], [0., 0.], [3., 1.]]])
    target = torch.tensor([[[0., 0.], [5., 5.], [1., 1.]]])
    mask = torch.tensor([[1., 0., 0.5]])
    # per-position MSE over channels: (1 + 4) / 2 = 2.5, 25, (4 + 0) / 2 = 2; weighted by mask
    expected = (1 * 2.5 + 0 * 25 + 0.5 * 2) / 1.5
    assert MaskedAutoencoderViT.forward_loss(pred, target, mask).item() == pytest.approx(expected)


def test_recal_mask_repeats_and_averages():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64)  # 4x4 patch grid
    mask = torch.zeros(1, 16)
    mask[0, [0, 1, 4, 6]] = 1  # patches (0,0) (0,1) (1,0) (1,2)
    grid = mask.reshape(4, 4)
    up4 = model.recal_mask(mask, 0).reshape(16, 16)
    assert torch.equal(up4, grid.repeat_interleave(4, 0).repeat_interleave(4, 1))
    half = model.recal_mask(mask, 3).reshape(2, 2)
    assert torch.equal(half, torch.tensor([[0.75, 0.25], [0.0, 0.0]]))


def test_noise_decides_the_mask_like_official_rand():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64).eval()
    imgs = torch.randn(3, 3, 64, 64)
    torch.manual_seed(7)
    loss_rand, _ = model(imgs, mask_ratio=0.75)
    torch.manual_seed(7)
    noise = torch.rand(3, 16)
    loss_noise, _ = model(imgs, mask_ratio=0.75, noise=noise)
    assert loss_rand.item() == loss_noise.item()
    mask, _ = model.predict(imgs, 0.75, noise)
    kept = torch.argsort(noise, dim=1)[:, :4]
    expected = torch.ones(3, 16).scatter_(1, kept, 0.0)
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match='noise must have shape'):
        model(imgs, noise=torch.rand(3, 15))


def test_total_loss_is_sum_of_scales_and_backprops():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64)
    loss, logs = model(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 16))
    assert set(logs) == {'loss_scale4', 'loss_scale2', 'loss_scale1', 'loss_scale0.5'}
    assert loss.item() == pytest.approx(sum(v.item() for v in logs.values()), rel=1e-6)
    loss.backward()
    assert model.blocks[11].mlp.fc2.weight.grad is not None
    assert model.decoder[0].pred[4].weight.grad is not None
    assert model.pos_embed.grad is None and model.hog_enc[0].conv.weight.grad is None


@pytest.mark.parametrize('size', [32, 96, 160])
def test_any_input_size_with_even_grid(size):
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=size)
    g = size // 16
    _, outputs = model.predict(torch.randn(1, 3, size, size), 0.75)
    assert [o[0].shape[1] for o in outputs] == [(4 * g) ** 2, (2 * g) ** 2, g ** 2, (g // 2) ** 2]
    assert all(pred.shape == target.shape for pred, target, _ in outputs)


@pytest.mark.parametrize('size', [72, 80])
def test_input_size_incompatible_with_patch_grid(size):
    with pytest.raises(ValueError, match='--input_size'):
        timm.create_model('MIM_vit_tiny_patch16', img_size=size)


def numpy_pooled_hog(img, nbins, cells):
    """numpy_hog with `cells` x `cells` cells of H / cells pixels, possibly fractional (ViT-H/14 at 224 px: 3.5):
    cell i averages the pixels it touches, [floor(i * H / cells), ceil((i + 1) * H / cells))."""
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    H = img.shape[-1]
    pool = np.zeros((cells, H))
    for i in range(cells):
        lo, hi = (i * H) // cells, -((-(i + 1) * H) // cells)
        pool[i, lo:hi] = 1 / (hi - lo)
    channels = []
    for ch in img.astype(np.float64):
        p = np.pad(ch, 1, mode='reflect')
        gx = sum(kx[a, b] * p[a:a + H, b:b + H] for a in range(3) for b in range(3))
        gy = sum(kx.T[a, b] * p[a:a + H, b:b + H] for a in range(3) for b in range(3))
        bins = np.mod(np.floor(np.arctan2(gx, gy) / np.pi * nbins), nbins).astype(int)
        hist = np.stack([np.where(bins == b, np.hypot(gx, gy), 0.0) for b in range(nbins)])
        hist = pool @ hist @ pool.T
        channels.append(hist / np.maximum(np.sqrt((hist ** 2).sum(0, keepdims=True)), 1e-12))
    out = np.concatenate(channels, 0)
    return out.reshape(out.shape[0], -1).T


def test_patch14_targets_match_decoder_grids():
    model = MaskedAutoencoderViT(img_size=56, patch_size=14, embed_dim=64, depth=6, num_heads=2,
                                 decoder_embed_dim=32, decoder_num_heads=2)
    _, outputs = model.predict(torch.randn(2, 3, 56, 56), 0.75)
    assert [o[1].shape[1] for o in outputs] == [16 ** 2, 8 ** 2, 4 ** 2, 2 ** 2]
    assert all(pred.shape == target.shape for pred, target, _ in outputs)


def test_patch14_pooled_hog_values_at_224():
    """MIM_vit_huge_patch14's targets at 224 px: a 16-patch grid, so HOG cells of 3.5, 7, 14 and 28 pixels
    (64, 32, 16, 8 cells a side), the 3.5-pixel ones pooled over the pixels each cell touches. A small model with
    the same patch size and input size has the same HOG layers and target grids."""
    model = MaskedAutoencoderViT(img_size=224, patch_size=14, embed_dim=32, depth=4, num_heads=2,
                                 decoder_embed_dim=32, decoder_num_heads=2)
    torch.manual_seed(0)
    imgs = torch.randint(-8, 9, (1, 3, 224, 224)) / 4.0  # quarter-integers: exact Sobel sums (see above)
    hist = model.shared_histogram(imgs)
    for k, cells in enumerate([64, 32, 16, 8]):
        target = model.HOG(imgs, k, hist)
        assert target.shape == (1, cells ** 2, 27)
        np.testing.assert_allclose(target[0].numpy(), numpy_pooled_hog(imgs[0].numpy(), 9, cells), atol=2e-5,
                                   err_msg=f'{cells} cells')


def official_layout(embed_dim, depth, nbins=9, dec=256, grid=14, hog_bias=False):
    """Key -> shape of the official models_mim.MaskedAutoencoderViT state dict."""
    D, L = embed_dim, grid * grid + 1
    keys = {'cls_token': (1, 1, D), 'pos_embed': (1, L, D), 'patch_embed.proj.weight': (D, 3, 16, 16),
            'patch_embed.proj.bias': (D,)}

    def block(prefix, d):
        return {f'{prefix}.norm1.weight': (d,), f'{prefix}.norm1.bias': (d,), f'{prefix}.attn.qkv.weight': (3 * d, d),
                f'{prefix}.attn.qkv.bias': (3 * d,), f'{prefix}.attn.proj.weight': (d, d),
                f'{prefix}.attn.proj.bias': (d,), f'{prefix}.norm2.weight': (d,), f'{prefix}.norm2.bias': (d,),
                f'{prefix}.mlp.fc1.weight': (4 * d, d), f'{prefix}.mlp.fc1.bias': (4 * d,),
                f'{prefix}.mlp.fc2.weight': (d, 4 * d), f'{prefix}.mlp.fc2.bias': (d,)}
    for i in range(depth):
        keys.update(block(f'blocks.{i}', D))
    for k in range(4):
        keys.update({f'norm.{k}.weight': (D,), f'norm.{k}.bias': (D,)})
    out = 3 * nbins
    preds = [{'pred.0.weight': (dec, dec // 2, 2, 2), 'pred.0.bias': (dec // 2,), 'pred.1.weight': (dec // 2,),
              'pred.1.bias': (dec // 2,), 'pred.3.weight': (dec // 2, dec // 4, 2, 2), 'pred.3.bias': (dec // 4,),
              'pred.4.weight': (out, dec // 4, 1, 1), 'pred.4.bias': (out,)},
             {'pred.0.weight': (dec, dec // 2, 2, 2), 'pred.0.bias': (dec // 2,),
              'pred.1.weight': (out, dec // 2, 1, 1), 'pred.1.bias': (out,)},
             {'pred.0.weight': (out, dec, 1, 1), 'pred.0.bias': (out,)},
             {'pred.1.weight': (out, dec, 1, 1), 'pred.1.bias': (out,)}]
    for k in range(4):
        p = f'decoder.{k}'
        keys.update({f'{p}.mask_token': (1, 1, dec), f'{p}.pos_embed': (1, L, dec), f'{p}.embed.weight': (dec, D),
                     f'{p}.embed.bias': (dec,), f'{p}.norm.weight': (dec,), f'{p}.norm.bias': (dec,)})
        keys.update(block(f'{p}.blocks.0', dec))
        keys.update({f'{p}.{name}': shape for name, shape in preds[k].items()})
        keys[f'hog_enc.{k}.conv.weight'] = (2, 1, 3, 3)
        if hog_bias:
            keys[f'hog_enc.{k}.conv.bias'] = (2,)
    return keys


@pytest.mark.parametrize('name,dim,depth,nbins,hog_bias', [('MIM_vit_base_patch16', 768, 12, 9, False),
                                                           ('MIM_vit_tiny_patch16', 192, 12, 18, True)])
def test_official_state_dict_layout_loads_strictly_both_ways(name, dim, depth, nbins, hog_bias):
    layout = official_layout(dim, depth, nbins, hog_bias=hog_bias)
    if name == 'MIM_vit_base_patch16':
        assert len(layout) == 248  # keys of the official ViT-B state dict
    torch.manual_seed(0)
    official = {k: torch.randn(shape) for k, shape in layout.items()}
    model = timm.create_model(name, hog_nbins=nbins, hog_bias=hog_bias)
    model.load_state_dict(official, strict=True)
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == layout
    assert all(torch.equal(ours[k], official[k]) for k in layout)
    fresh = timm.create_model(name, hog_nbins=nbins, hog_bias=hog_bias)
    fresh.load_state_dict(ours, strict=True)


def test_trainable_parameter_counts_vit_base():
    model = timm.create_model('MIM_vit_base_patch16', hog_nbins=9)
    per_decoder = [sum(p.numel() for p in d.parameters() if p.requires_grad) for d in model.decoder]
    assert per_decoder == [1153435, 1122075, 994331, 994331]  # the official decoders' sizes
    encoder = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith('decoder'))
    assert encoder == 85651968


def test_sincos_pos_embed_layout():
    from models.pos_embed import get_2d_sincos_pos_embed
    emb = get_2d_sincos_pos_embed(8, 3, cls_token=True)
    assert emb.dtype == np.float64 and emb.shape == (10, 8) and not emb[0].any()
    r, c = 1, 2  # token 1 + r * 3 + c; first half column, second half row; sin then cos, omega = 1, 1e-2
    expected = [np.sin(c), np.sin(c / 100), np.cos(c), np.cos(c / 100),
                np.sin(r), np.sin(r / 100), np.cos(r), np.cos(r / 100)]
    np.testing.assert_allclose(emb[1 + r * 3 + c], expected, rtol=0, atol=1e-15)


def test_shared_histogram_gives_the_per_scale_targets_exactly():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64)
    imgs = torch.randn(2, 3, 64, 64)
    hist = model.shared_histogram(imgs)
    for k in range(4):
        assert torch.equal(model.HOG(imgs, k, hist), model.HOG(imgs, k))
    assert timm.create_model('MIM_vit_tiny_patch16', img_size=64, hog_bias=True).shared_histogram(imgs) is None
