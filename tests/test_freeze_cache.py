"""FreezeOut's frozen-prefix cache: exact under fixed views, rebuilt when the depth grows, bounded."""
import json

import pytest
import timm
import torch

import models  # noqa: F401
import run_pretrain
from test_run_pretrain import pretrain_args, write_images
from util.datasets import ImageFolderOrFlat, build_pretrain_transform
from util.freeze_cache import FixedViews, FrozenPrefixCache
from util.freezeout import FreezeOut, FreezeOutSchedule


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


def test_cache_is_rebuilt_when_depth_grows_and_respects_its_limit(tmp_path):
    model, freezeout, opt = frozen_tiny(2)
    imgs, indices = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    cache = FrozenPrefixCache(model, seed=0, max_bytes=2 ** 30)
    cache.forward_kwargs(imgs, indices, 0.75)
    freezeout.freeze(opt, 4)
    out = cache.forward_kwargs(imgs, indices, 0.75)
    assert cache.depth == 4 and cache.misses == 4 and cache.hits == 0
    assert torch.equal(out['prefix'][0], model.forward_prefix(imgs, 0.75, out['noise'])[0])
    one_entry = sum(t[0].numel() * t.element_size() for t in out['prefix'])
    small = FrozenPrefixCache(model, seed=0, max_bytes=one_entry)
    small.forward_kwargs(imgs, indices, 0.75)
    assert len(small.entries) == 1 and small.bytes <= one_entry


def test_run_with_freeze_cache(tmp_path):
    data = write_images(tmp_path / 'flat', 8)
    out = tmp_path / 'out'
    run_pretrain.main(pretrain_args(data, out, '--epochs', '3', '--warmup_epochs', '0', '--how_scale', 'linear',
                                    '--t_0', '0.3', '--num_workers', '0', '--freeze_cache'))
    log = [json.loads(line) for line in open(out / 'log.txt')]
    assert [e['active_units'] for e in log] == [13, 9, 3]
    with pytest.raises(ValueError, match='--how_scale'):
        run_pretrain.main(pretrain_args(data, tmp_path / 'x', '--freeze_cache'))
