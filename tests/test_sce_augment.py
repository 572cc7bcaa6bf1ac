"""SCE GPU batch video augmentation (util/sce/augment.py): default parameters, per-clip randomness
shared by all frames, probabilities, and every op against torchvision's single-image kernels."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from util.sce.augment import (JITTER_ORDERS, SCEVideoAugment, build_sce_augmentations, clip_pair_grid, gaussian_blur,
                              jitter_orders, select)

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


ALWAYS = dict(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0, hflip_p=1.0)
PROBS = {'default': {}, 'always': ALWAYS,
         'mixed': dict(jitter_p=1.0, grayscale_p=1.0, blur_p=0.5, solarize_p=0.5, hflip_p=0.5)}


def clips(b=8, t=4, hw=16, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, t, hw, hw), generator=g).to(dtype)


def reference(clip, p, i, aug):
    """Clip i augmented frame by frame with torchvision.transforms.v2.functional; [3, T, H, W]."""
    x = clip.permute(1, 0, 2, 3).float() / 255  # [T, C, H, W]: a batch of frames
    if p['jitter'][i]:
        for op in p['jitter_order'][i].tolist():
            fn, f = [(TF.adjust_brightness, p['brightness']), (TF.adjust_contrast, p['contrast']),
                     (TF.adjust_saturation, p['saturation']), (TF.adjust_hue, p['hue'])][op]
            x = fn(x, f[i].item())
    if p['grayscale'][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p['blur'][i]:
        s = p['sigma'][i].item()
        x = TF.gaussian_blur(x, [aug.blur_kernel] * 2, [s, s])
    if p['solarize'][i]:
        x = TF.solarize(x, aug.solarize_threshold)
    if p['hflip'][i]:
        x = TF.horizontal_flip(x)
    x = TF.normalize(x, list(aug.mean), list(aug.std))
    return x.permute(1, 0, 2, 3)


def test_default_parameters_and_overrides():
    a0, a1 = build_sce_augmentations()
    for a in (a0, a1):
        assert a.jitter['brightness'] == pytest.approx((0.2, 1.8))
        assert a.jitter['contrast'] == pytest.approx((0.2, 1.8))
        assert a.jitter['saturation'] == pytest.approx((0.6, 1.4))
        assert a.jitter['hue'] == pytest.approx((-0.2, 0.2))
        assert (a.jitter_p, a.grayscale_p, a.hflip_p) == (0.8, 0.2, 0.5)
        assert (a.blur_kernel, a.blur_sigma) == (23, (0.1, 2.0))
        assert a.solarize_threshold == 0.5
        assert a.mean == (0.45,) * 3 and a.std == (0.225,) * 3
    assert (a0.blur_p, a0.solarize_p) == (1.0, 0.0)
    assert (a1.blur_p, a1.solarize_p) == (0.1, 0.2)
    b0, b1 = build_sce_augmentations(brightness=0.4, hue=0.1, pipeline1=dict(solarize_p=0.5))
    assert b0.jitter['brightness'] == pytest.approx((0.6, 1.4)) == b1.jitter['brightness']
    assert b0.jitter['hue'] == pytest.approx((-0.1, 0.1))
    assert (b0.solarize_p, b1.solarize_p) == (0.0, 0.5)
    with pytest.raises(ValueError):
        SCEVideoAugment(2)


@pytest.mark.parametrize('pipeline', [0, 1])
@pytest.mark.parametrize('probs', list(PROBS))
def test_matches_torchvision_per_clip(pipeline, probs):
    aug = SCEVideoAugment(pipeline, **PROBS[probs])
    x = clips(b=32, seed=pipeline)
    out = aug(x, generator=torch.Generator().manual_seed(1))
    p = aug.last_params
    assert out.shape == x.shape and out.dtype == torch.float32
    for i in range(x.shape[0]):
        torch.testing.assert_close(out[i], reference(x[i], p, i, aug), atol=2e-5, rtol=1e-5)
    if probs == 'always':  # every op ran; solarize (p 0.2 in pipeline 1) only when asked
        assert all(p[k].all() for k in ('jitter', 'grayscale', 'blur', 'solarize', 'hflip'))


def test_jitter_order_matters_and_is_followed():
    aug = SCEVideoAugment(0, **{**ALWAYS, 'grayscale_p': 0.0, 'blur_p': 0.0, 'hflip_p': 0.0})
    x = clips(b=2, seed=3)
    p = aug.sample_params(2, torch.Generator().manual_seed(0))
    p['brightness'][:] = 1.7
    p['contrast'][:] = 0.3
    p['jitter_order'] = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])  # b then c / c then b
    x[1] = x[0]
    out = aug.apply(x, p)
    assert (out[0] - out[1]).abs().max() > 0.05
    for i in range(2):
        torch.testing.assert_close(out[i], reference(x[i], p, i, aug), atol=2e-5, rtol=1e-5)


def test_jitter_orders_follow_torchaug_chunks():
    g = torch.Generator().manual_seed(0)
    for n in (5, 24, 40, 64):
        mask = torch.zeros(70, dtype=torch.bool)
        mask[torch.randperm(70, generator=g)[:n]] = True
        orders = jitter_orders(mask, g)[mask]
        assert (orders.sort(1).values == torch.arange(4)).all()  # permutations of the 4 ops
        chunk = math.ceil(n / min(n, 24))
        uniq, counts = orders.unique(dim=0, return_counts=True)
        assert len(uniq) == math.ceil(n / chunk)  # distinct order per chunk
        assert counts.max() == chunk and counts.sum() == n
    # every one of the 24 orders shows up over many batches
    seen = torch.cat([jitter_orders(torch.ones(6, dtype=torch.bool), g) for _ in range(100)])
    assert len(seen.unique(dim=0)) == len(JITTER_ORDERS)


def test_same_on_all_frames_and_random_per_clip():
    one = clips(b=1, t=1, seed=4)
    x = one.expand(64, 3, 4, 16, 16).contiguous()  # 64 copies of one still clip
    aug = SCEVideoAugment(1)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    frames = out.unbind(2)
    for f in frames[1:]:
        torch.testing.assert_close(f, frames[0], atol=1e-6, rtol=0)
    flat = out[:, :, 0].flatten(1)
    # clips differ (except the ~6% drawn with no op at all: no jitter, blur, flip, gray, solarize)
    assert len(torch.unique(flat.round(decimals=4), dim=0)) > 50
    # per-clip parameters, different across clips
    p = aug.last_params
    assert len(p['brightness'].unique()) == 64 and len(p['sigma'].unique()) == 64


def test_probabilities():
    """Count-based selection: floor/ceil(p B) clips per batch, each clip with probability p."""
    g = torch.Generator().manual_seed(0)
    for aug in build_sce_augmentations():
        B, n = 64, 300
        ps = [aug.sample_params(B, g) for _ in range(n)]
        for key, p in [('jitter', 0.8), ('grayscale', 0.2), ('blur', aug.blur_p),
                       ('solarize', aug.solarize_p), ('hflip', 0.5)]:
            masks = torch.stack([q[key] for q in ps]).float()
            counts = masks.sum(1)
            assert set(counts.tolist()) <= {math.floor(p * B), math.ceil(p * B)}, key
            assert abs(counts.mean().item() - p * B) < 4 * math.sqrt(p * B * 0.25 / n) + 1e-9, key
            freq = masks.mean(0)  # per position: no position is favoured
            assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, key
        for key, (lo, hi) in list(aug.jitter.items()) + [('sigma', aug.blur_sigma)]:
            v = torch.cat([q[key] for q in ps])
            assert lo <= v.min() and v.max() <= hi, key
            assert abs(v.mean() - (lo + hi) / 2) < 0.01 * (hi - lo), key  # uniform mean
    # p * B < 1: still probability p per clip (torchaug would give p / B)
    hits = torch.stack([select(0.2, 4, g) for _ in range(4000)]).float()
    assert (hits.sum(1) <= 1).all() and abs(hits.mean() - 0.2) < 0.02
    iid = torch.stack([select(0.3, 8, g, mode='iid') for _ in range(2000)]).float()
    assert abs(iid.mean() - 0.3) < 0.02 and len(iid.sum(1).unique()) > 2


def test_effects_follow_the_sampled_flags():
    """Flip and solarize are visible exactly on the clips they were drawn for."""
    x = clips(b=64, seed=5)
    aug = SCEVideoAugment(1, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.3)
    out = aug(x, generator=torch.Generator().manual_seed(2))
    p = aug.last_params
    base = (x.float() / 255 - 0.45) / 0.225
    sol = torch.where(x.float() / 255 >= 0.5, 1 - x.float() / 255, x.float() / 255)
    sol = (sol - 0.45) / 0.225
    for i in range(64):
        want = sol[i] if p['solarize'][i] else base[i]
        want = want.flip(-1) if p['hflip'][i] else want
        torch.testing.assert_close(out[i], want)
    assert p['solarize'].sum() in (19, 20) and p['hflip'].sum() == 32


def test_inputs_uint8_float_and_negative():
    x = clips(b=6)
    aug = SCEVideoAugment(1)
    out_u8 = aug(x, generator=torch.Generator().manual_seed(0))
    x_f = x.float()
    out_f = aug(x_f, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_u8, out_f)
    assert torch.equal(x_f, x.float())  # caller's clips untouched
    # Div255 does not clamp: with no jitter, negative values pass through to the normalised output
    neg = x_f - 128
    ident = SCEVideoAugment(0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, hflip_p=0.0)
    torch.testing.assert_close(ident(neg), (neg / 255 - 0.45) / 0.225)
    # every jittered clip ends in [0, 1] (whatever op comes first); nothing becomes NaN
    for seed in range(4):
        jit = SCEVideoAugment(0, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, hflip_p=0.0)(
            neg, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(jit).all()
        assert jit.min() >= -0.45 / 0.225 - 1e-5 and jit.max() <= 0.55 / 0.225 + 1e-5


def test_blur_is_the_2d_gaussian():
    x = torch.rand(3, 3, 2, 24, 20, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64)
    out = gaussian_blur(x, sigma, 23)
    for i in range(3):
        s = sigma[i].item()
        ref = TF.gaussian_blur(x[i].transpose(0, 1), [23, 23], [s, s]).transpose(0, 1)
        torch.testing.assert_close(out[i], ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[0], x[0], atol=1e-12, rtol=0)  # sigma 0.1 ~ identity


def test_generator_reproducible_and_grid():
    x = clips(b=8)
    a0, a1 = build_sce_augmentations()
    v0 = a0(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(v0, a0(x, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(v0, a0(x, generator=torch.Generator().manual_seed(8)))
    v1 = a1(x)
    grid = clip_pair_grid(v0, v1, n=4)
    assert grid.shape == (3, 4 * 18 + 2, 2 * 18 + 2) and 0 <= grid.min() and grid.max() <= 1
    assert clip_pair_grid(v0, v1, n=2, frames=3).shape == (3, 2 * 18 + 2, 6 * 18 + 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    x = clips(b=16)
    for aug in build_sce_augmentations():
        cpu = aug(x, generator=torch.Generator().manual_seed(0))
        gpu = aug(x.cuda(), generator=torch.Generator().manual_seed(0))
        assert gpu.device.type == 'cuda'
        torch.testing.assert_close(gpu.cpu(), cpu, atol=5e-3, rtol=0)  # TF32 convs allowed
