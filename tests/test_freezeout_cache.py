"""FreezeOut's frozen-prefix cache (util/freezeout/cache.py): exact under fixed views, rebuilt when the depth
grows, bounded."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import models  # noqa: F401
from models.localmim import MaskedAutoencoderViT
import run_pretrain
from helpers import REPO, free_port, log_entries, pretrain_args, write_images
from util.data.datasets import ImageFolderOrFlat, build_pretrain_transform
from util.freezeout.cache import FixedViews, FrozenPrefixCache
from util.freezeout.schedule import FreezeOut, FreezeOutSchedule


def frozen_tiny(units):
    torch.manual_seed(0)
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32)
    freezeout = FreezeOut(model, FreezeOutSchedule(13, 'linear', 0.5, 10, 0, 1e-3, 0.0))
    opt = torch.optim.AdamW(freezeout.param_groups(0.05), lr=1e-3)
    freezeout.freeze(opt, units)
    return model, freezeout, opt


def test_fixed_views_repeat_and_leave_global_rng_alone(tmp_path):
    dataset = ImageFolderOrFlat(write_images(tmp_path / 'img', 3), build_pretrain_transform(32))
    views = FixedViews(dataset, seed=0)
    state = torch.get_rng_state()
    first, index = views[2]
    assert index == 2 and torch.equal(first, views[2][0]) and not torch.equal(first, FixedViews(dataset, 1)[2][0])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('on_disk', [False, True])
def test_cache_returns_exactly_the_recomputed_prefix(tmp_path, on_disk):
    model, _, _ = frozen_tiny(5)
    cache = FrozenPrefixCache(model, seed=0, max_bytes=2 ** 30, folder=tmp_path / 'cache' if on_disk else None)
    imgs, indices = torch.randn(4, 3, 32, 32), torch.tensor([7, 3, 11, 0])
    miss = cache.forward_kwargs(imgs, indices, 0.75)
    hit = cache.forward_kwargs(imgs, indices, 0.75)
    assert (cache.misses, cache.hits) == (4, 4) and len(cache.entries) == 4
    assert torch.equal(hit['noise'], cache.noise(indices, 'cpu'))
    recomputed = model.forward_prefix(imgs, 0.75, hit['noise'])
    for cached, fresh in zip(hit['prefix'], recomputed):
        assert torch.equal(cached, fresh)
    assert all(torch.equal(a, b) for a, b in zip(miss['prefix'], hit['prefix']))
    loss_cached, _ = model(imgs, 0.75, **hit)
    loss_fresh, _ = model(imgs, 0.75, noise=hit['noise'])
    assert loss_cached.item() == loss_fresh.item()


def test_a_batch_with_new_samples_computes_only_theirs(monkeypatch):
    """Stored samples stay served when the batch also holds samples never stored: only the new ones run the prefix
    from the image (at the start of each epoch after the first freeze, most batches mix both)."""
    model, _, _ = frozen_tiny(5)
    model.double()
    cache = FrozenPrefixCache(model, seed=0, max_bytes=2 ** 30)
    imgs = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cache.forward_kwargs(imgs[[0, 2]], torch.tensor([7, 3]), 0.75)
    computed = []
    real_prefix = model.forward_prefix
    monkeypatch.setattr(model, 'forward_prefix', lambda imgs, *a: computed.append(len(imgs)) or real_prefix(imgs, *a))
    out = cache.forward_kwargs(imgs, torch.tensor([7, 9, 3, 4]), 0.75)
    assert computed == [2] and (cache.hits, cache.misses) == (2, 4) and len(cache.entries) == 4
    fresh = real_prefix(imgs, 0.75, out['noise'])
    torch.testing.assert_close(out['prefix'][0], fresh[0], rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(out['prefix'][1:], fresh[1:]))


@pytest.mark.parametrize('dtype, amp, on_disk', [(torch.float64, False, False), (torch.float32, False, True),
                                                 (torch.float32, True, False)])
def test_a_deeper_depth_carries_the_stored_prefixes_on_and_equals_a_full_recomputation(tmp_path, dtype, amp, on_disk):
    """Depths 2 -> 4 -> 7: each change costs the blocks in between, never the prefix from the image."""
    model, freezeout, opt = frozen_tiny(2)
    model.to(dtype)
    imgs, indices = torch.randn(3, 3, 32, 32, dtype=dtype), torch.tensor([0, 5, 1])
    cache = FrozenPrefixCache(model, seed=0, max_bytes=2 ** 30, folder=tmp_path / 'cache' if on_disk else None)
    with torch.autocast('cpu', torch.bfloat16, enabled=amp):
        cache.forward_kwargs(imgs, indices, 0.75)
        for depth, advanced in ((4, 3), (7, 6)):
            freezeout.freeze(opt, depth)
            out = cache.forward_kwargs(imgs, indices[[2, 0, 1]], 0.75)  # another order than when stored
            assert (cache.depth, cache.misses, cache.hits, cache.advanced) == (depth, 3, advanced, advanced)
            fresh = model.forward_prefix(imgs[[2, 0, 1]], 0.75, out['noise'])
            assert out['prefix'][0].dtype == fresh[0].dtype
            tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype] if not amp else 2e-2
            torch.testing.assert_close(out['prefix'][0], fresh[0], rtol=tolerance, atol=tolerance)
            assert all(torch.equal(a, b) for a, b in zip(out['prefix'][1:], fresh[1:]))  # mask, restore order
    assert {d for d, _, _ in cache.entries.values()} == {7}


def test_the_fixed_mask_noise_covers_every_patch_and_repeats():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=64)  # a 4x4 grid
    cache = FrozenPrefixCache(model, seed=3, max_bytes=0)
    noise = cache.noise(torch.tensor([5, 9]), 'cpu')
    assert noise.shape == (2, 16) and torch.equal(noise, cache.noise(torch.tensor([5, 9]), 'cpu'))
    assert not torch.equal(noise[0], noise[1])


def test_the_store_respects_its_limit(tmp_path):
    model, _, _ = frozen_tiny(2)
    imgs, indices = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    out = FrozenPrefixCache(model, seed=0, max_bytes=2 ** 30).forward_kwargs(imgs, indices, 0.75)
    one_entry = sum(t[0].numel() * t.element_size() for t in out['prefix'])
    small = FrozenPrefixCache(model, seed=0, max_bytes=one_entry)
    small.forward_kwargs(imgs, indices, 0.75)
    assert len(small.entries) == 1 and small.bytes == one_entry  # the bytes of what it holds, exactly


def test_run_with_freeze_cache(tmp_path, monkeypatch):
    """A real run reuses cached prefixes and they equal the recomputed ones. Four images in one batch: one step
    per epoch, every sample in every step. Cubic FreezeOut over 7 epochs (t_0 0.01) freezes 0, 7, 8, 10, 10, 11,
    12 units at the start of epochs 0..6: epoch 1 computes the depth-7 prefixes, epoch 4 (depth 10 again) is served
    as stored, the other epochs carry the stored prefixes on through the newly frozen blocks."""
    prefix_calls, recheck = [], []
    real_prefix = MaskedAutoencoderViT.forward_prefix

    def counting_prefix(self, imgs, mask_ratio, noise=None):
        prefix_calls.append(self.frozen_units)
        return real_prefix(self, imgs, mask_ratio, noise)

    class CheckedCache(FrozenPrefixCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

        def forward_kwargs(self, samples, indices, mask_ratio):
            hits = self.hits
            out = super().forward_kwargs(samples, indices, mask_ratio)
            if self.hits > hits:  # served from the cache: must equal a fresh computation on this batch
                fresh = real_prefix(self.model, samples, mask_ratio, out['noise'])
                recheck.append(all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
                                   for a, b in zip(out['prefix'], fresh)))
            return out

    caches = []
    monkeypatch.setattr(MaskedAutoencoderViT, 'forward_prefix', counting_prefix)
    monkeypatch.setattr(run_pretrain, 'FrozenPrefixCache', CheckedCache)
    data = write_images(tmp_path / 'flat', 4)
    out = tmp_path / 'out'
    run_pretrain.main(pretrain_args(data, out, '--epochs', '7', '--warmup_epochs', '0', '--how_scale', 'cubic',
                                    '--t_0', '0.01', '--num_workers', '0', '--freeze_cache'))
    log = log_entries(out)
    assert [e['active_units'] for e in log] == [13, 6, 5, 3, 3, 2, 1]
    assert [(e['train_store_hits'], e['train_store_advanced'], e['train_store_misses']) for e in log] == \
        [(0, 0, 0), (0, 0, 4), (4, 4, 0), (4, 4, 0), (4, 0, 0), (4, 4, 0), (4, 4, 0)]
    assert prefix_calls == [0, 7]  # the frozen units' depth of each prefix forward from the image
    (cache,) = caches
    assert (cache.hits, cache.misses, cache.advanced) == (5 * 4, 4, 4 * 4)
    assert recheck == [True] * 5
    with pytest.raises(ValueError, match='--how_scale'):
        run_pretrain.main(pretrain_args(data, tmp_path / 'x', '--freeze_cache'))


@pytest.mark.slow
@pytest.mark.parametrize('sampler', ['auto', 'standard'])
def test_two_processes_hit_their_stores_after_the_first_frozen_epoch(tmp_path, sampler):
    """torchrun, 2 gloo processes, 16 images, batch 2 per process: with the rank-sticky sampler (the default with
    --freeze_cache) every sample is in its process's store from the first frozen epoch on, so no later step
    recomputes a prefix from the image; the official sampler moves samples between processes every epoch."""
    data = write_images(tmp_path / 'images', 16)
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'run_pretrain.py', '--data_path', str(data), '--output_dir', str(out), '--model', 'MIM_vit_tiny_patch16',
           '--input_size', '32', '--batch_size', '2', '--epochs', '4', '--warmup_epochs', '0', '--how_scale', 'linear',
           '--t_0', '0.3', '--freeze_cache', '--sampler', sampler, '--num_workers', '0', '--device', 'cpu',
           '--print_freq', '100', '--vis_freq', '0']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [(e['train_store_hits'], e['train_store_advanced'], e['train_store_misses']) for e in log_entries(out)]
    # the first epoch frozen from its start: 8 steps of 2 samples on both processes; it stores every sample it sees
    first = next(epoch for epoch, (hits, _, misses) in enumerate(counts) if hits + misses == 16)
    assert first + 1 < len(counts)
    later_misses = [misses for _, _, misses in counts[first + 1:]]
    if sampler == 'auto':
        assert later_misses == [0] * len(later_misses)
        assert all(hits == 16 for hits, _, _ in counts[first + 1:])
    else:
        assert all(misses > 0 for misses in later_misses)
