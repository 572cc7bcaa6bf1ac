"""FreezeOut feature masking (util/freezeout/feature_masking.py): depth 0 is LocalMIM, stored features are the
frozen prefix on the fixed view, fresh masks pick the visible stored tokens in order, the feature target's loss,
decoder pruning, resume and DDP."""
import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import models  # noqa: F401
import run_pretrain
from helpers import (GradRecorder, assert_same_grads, free_port, gloo_group, log_entries, pretrain_args,
                     straight_and_resumed, write_images)
from engine import train_one_epoch
from util.checkpoint import LAST
from util.data.datasets import ImageFolderOrFlat, build_pretrain_transform
from util.freezeout.feature_masking import NOT_STORED, FeatureMasking, SwitchableViews
from util.freezeout.schedule import FreezeOut, FreezeOutSchedule
from util.runtime import attach_ddp
from util.train_step import TrainStep

pytestmark = pytest.mark.usefixtures('one_thread')

# 8 images, batch 4: 2 steps per epoch. Linear FreezeOut, t_0 0.3 over 3 epochs: depth 0 in epoch 0, then 1 and 4
# frozen units in epoch 1 (fixed views from its start: unit 0 froze at epoch 0.9), 7 and 10 in epoch 2.
FLAGS = ('--epochs', '3', '--warmup_epochs', '0', '--how_scale', 'linear', '--t_0', '0.3', '--num_workers', '0')
MASKING = ('--feature_masking', '--feature_target', 'both', '--decoder_prune')


@pytest.fixture(scope='module')
def runs(module_tmp):
    data = write_images(module_tmp / 'flat', 8)
    run_pretrain.main(pretrain_args(data, module_tmp / 'plain', *FLAGS))
    straight, resumed = straight_and_resumed(run_pretrain, lambda out: pretrain_args(data, out, *FLAGS, *MASKING),
                                             2, module_tmp)
    return module_tmp / 'plain', straight, resumed


def test_depth_zero_is_standard_localmim_bit_for_bit(runs):
    plain, masking, _ = runs
    a = torch.load(plain / 'checkpoint-0.pth', weights_only=True)['model']
    b = torch.load(masking / 'checkpoint-0.pth', weights_only=True)['model']
    assert set(b) - set(a) == {f'decoder.{k}.feature_pred.{p}' for k in range(4) for p in ('weight', 'bias')}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_entries(plain)[0]['train_loss'] == log_entries(masking)[0]['train_loss']
    assert log_entries(plain)[1]['train_loss'] != log_entries(masking)[1]['train_loss']


def test_resume_across_a_depth_change_equals_uninterrupted_and_pruned_checkpoints_load(runs):
    _, straight, resumed = runs
    a = torch.load(straight / LAST, weights_only=True)
    b = torch.load(resumed / LAST, weights_only=True)
    assert a['extra']['frozen_units'] == b['extra']['frozen_units'] == 10
    assert a['extra']['pruned_stages'] == [0, 1]  # stages read blocks 1 and 3: frozen with units 2 and 4
    assert not any(k.startswith(('decoder.0.', 'decoder.1.')) for k in a['model'])
    assert a['model'].keys() == b['model'].keys()
    # The resumed run's store starts empty: in epoch 2 it computes the features from the image where the uninterrupted
    # run carries its stored depth-4 features on through blocks 4-6, equal to float rounding, not bit for bit (2.5e-7
    # on one CPU, bitwise on another). Other masks in the resumed epoch (another seed) move the weights by 1e-5.
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=0, atol=1e-6, msg=k)
    assert [e['train_loss'] for e in log_entries(resumed)] == \
        pytest.approx([e['train_loss'] for e in log_entries(straight)], rel=1e-5)
    logs = log_entries(straight)
    assert {'train_loss_feat1', 'train_loss_scale1'} <= set(logs[2])
    # fixed views from epoch 1; its two steps store 4 samples each and the store keeps them across the depth change
    assert 'train_stored_samples' not in logs[0] and logs[1]['train_stored_samples'] == (4 + 8) / 2


def frozen_tiny(units, target='hog', img_size=32):
    torch.manual_seed(0)
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=img_size)
    model.add_feature_heads(target)
    freezeout = FreezeOut(model, FreezeOutSchedule(13, 'linear', 0.5, 10, 0, 1e-3, 0.0))
    opt = torch.optim.AdamW(freezeout.param_groups(0.05), lr=1e-3)
    masking = FeatureMasking(freezeout, 0.75, max_bytes=2 ** 30)
    freezeout.freeze(opt, units)
    return model, masking


def prefix_by_hand(model, imgs, depth):
    """Patch embedding + positions, the cls token in front, then blocks 0 .. depth - 2, on every patch."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    cls = model.cls_token + model.pos_embed[:, :1]
    x = torch.cat([cls.expand(len(imgs), 1, -1), x], dim=1)
    for i in range(depth - 1):
        x = model.blocks[i](x)
    return x


@pytest.mark.parametrize('on_disk', [False, True])
def test_stored_features_are_the_prefix_recomputed_on_the_fixed_view(tmp_path, on_disk):
    model, masking = frozen_tiny(5)
    masking.folder = tmp_path / 'store' if on_disk else None
    views = SwitchableViews(ImageFolderOrFlat(write_images(tmp_path / 'img', 4), build_pretrain_transform(32)), 0)
    assert views[1][1] == NOT_STORED and not torch.equal(views[1][0], views[1][0])  # random views first
    views.fixed = True
    (imgs, indices), = DataLoader(views, batch_size=4)
    masking.compute_loss(model, imgs, indices)
    assert (masking.misses, len(masking.entries), masking.depth) == (4, 4, 5)
    with torch.no_grad():
        by_hand = prefix_by_hand(model, imgs, 5)
    for row, index in enumerate(indices.tolist()):
        assert torch.equal(masking.load(index)[1][0], by_hand[row]) and torch.equal(views[index][0], imgs[row])
    assert torch.equal(masking.features(imgs, indices), by_hand) and masking.hits == 4
    del masking.entries[indices[0].item()]  # one sample not stored (a full store): only that one is recomputed
    mixed = masking.features(imgs, indices)
    assert (masking.hits, masking.misses) == (7, 5) and torch.equal(mixed[1:], by_hand[1:])
    torch.testing.assert_close(mixed[0], by_hand[0], rtol=1e-5, atol=1e-5)
    with torch.autocast('cpu', torch.bfloat16), torch.no_grad():  # kept at the autocast dtype, used in float32
        masking.clear()
        used = masking.features(imgs, indices)
        by_hand = prefix_by_hand(model, imgs, 5)
    assert masking.load(0)[1][0].dtype == torch.bfloat16 and torch.equal(used, by_hand.bfloat16().float())


def test_views_are_fixed_from_the_first_epoch_that_starts_frozen(tmp_path):
    _, masking = frozen_tiny(0)
    masking.schedule = FreezeOutSchedule(13, 'linear', 0.3, 3, 0, 1e-3, 0.0)  # unit 0 freezes at epoch 0.9
    views = SwitchableViews(ImageFolderOrFlat(write_images(tmp_path / 'img', 2), build_pretrain_transform(32)), 0)
    fixed = []
    for epoch in range(3):
        masking.start_epoch(views, epoch)
        fixed.append(views.fixed)
    assert fixed == [False, True, True] and views[1][1] == 1 and torch.equal(views[1][0], views[1][0])


def test_fresh_mask_keeps_exactly_the_visible_stored_tokens_in_order():
    model, masking = frozen_tiny(3, img_size=64)  # 4 x 4 patches: 4 visible
    features = torch.randn(3, 17, 192)
    noise = masking.noise(features[:, 0, :1])
    assert not torch.equal(noise, masking.noise(features[:, 0, :1]))  # fresh each step
    x, mask, ids_restore = model.mask_features(features, 0.75, noise)
    for b in range(3):
        visible = sorted(torch.argsort(noise[b])[:4].tolist())
        assert mask[b].nonzero().flatten().tolist() == sorted(set(range(16)) - set(visible))
        assert torch.equal(x[b, 0], features[b, 0]) and torch.equal(x[b, 1:], features[b, 1 + torch.tensor(visible)])
    # the decoder's un-shuffle puts every visible token back at its patch
    filled = torch.cat([x[:, 1:], torch.zeros(3, 12, 192)], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, 192))
    assert torch.equal(filled, features[:, 1:] * (1 - mask[..., None]))


def test_before_the_first_freeze_the_step_is_localmims_at_the_runs_mask_ratio():
    torch.manual_seed(0)
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32)
    masking = FeatureMasking(FreezeOut(model, FreezeOutSchedule(13, 'linear', 0.5, 10, 0, 1e-3, 0.0)), 0.5, 2 ** 30)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    loss, _ = masking.compute_loss(model, imgs, torch.tensor([0, 1]))
    torch.manual_seed(1)
    expected, _ = model(imgs, 0.5, noise=masking.noise(imgs))
    assert torch.equal(loss, expected)


def test_depth_one_matches_the_exact_path():
    """At depth 1 only the (token-wise) patch embedding is frozen: masking its stored output is masking the image,
    so feature masking with the HOG target gives the exact FreezeOut loss for the same mask (no leak)."""
    model, masking = frozen_tiny(1, img_size=64)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    features = model.frozen_features(imgs)
    loss, logs = model(imgs, prefix=model.mask_features(features, 0.75, noise), features=features)
    exact, exact_logs = model(imgs, 0.75, noise=noise)
    assert logs.keys() == exact_logs.keys()
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-6)


def test_feature_target_loss_matches_a_hand_computation():
    model, masking = frozen_tiny(3, target='both')
    assert model.active_stages() == [1, 2, 3]
    assert all(model.decoder[k].feature_pred.weight.requires_grad for k in (1, 2, 3))
    imgs = torch.randn(2, 3, 32, 32)
    features, noise = model.frozen_features(imgs), torch.tensor([[0.3, 0.1, 0.9, 0.5], [0.2, 0.8, 0.4, 0.05]])
    prefix = model.mask_features(features, 0.75, noise)
    loss, logs = model(imgs, prefix=prefix, features=features)
    hog_only, _ = model(imgs, 0.75, prefix=prefix)  # the same HOG terms, through the exact path's code
    x, mask, ids_restore = prefix
    f = features[:, 1:].double()
    target = (f - f.mean(-1, keepdim=True)) / (f.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    expected = 0.0
    for i in range(2, 12):
        x = model.blocks[i](x)
        if i in (3, 9, 11):
            k = model.ID.index(i)
            pred = model.decoder[k].feature_pred(model.decoder[k].decode(model.norm[k](x), ids_restore)).double()
            # one visible patch each (the lowest noise: patch 1 of image 0, patch 3 of image 1), 6 masked
            per_token = ((pred - target) ** 2).mean(-1)
            term = sum(per_token[b, p] for b, kept in ((0, 1), (1, 3)) for p in range(4) if p != kept) / 6
            assert logs[f'loss_feat{model.scale[k]:g}'].item() == pytest.approx(term.item(), rel=1e-5)
            expected += term.item()
    assert loss.item() == pytest.approx(expected + hog_only.item(), rel=1e-5)


class ContentMask(FeatureMasking):
    """Masks that depend only on the sample, not on the batch split (so 2 processes can equal 1)."""

    def noise(self, samples):
        return samples[:, 0, ::16, ::16].flatten(1)


def run_masking_epochs(model, world=1, rank=0, batch_size=4, recorder=None):
    """4 epochs of one accumulation window: depth 0, 4, 4 (served from the store), 10 (the stored depth-4 features
    carried on to 10). Plain SGD."""
    schedule = FreezeOutSchedule(13, 'linear', 0.3, 4, 0, 0.05, 0.0)
    schedule.freeze_at = [1.0] * 4 + [3.0] * 6 + [9.0] * 3
    freezeout = FreezeOut(model, schedule, prune=True)
    opt = torch.optim.SGD(freezeout.param_groups(0.0), lr=0.05)
    trainer = TrainStep(model, opt, 'cpu', accum_iter=2)
    masking = ContentMask(freezeout, 0.75, max_bytes=2 ** 30)
    attach_ddp(trainer, torch.device('cpu'), freezeout)
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    losses = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        losses.append(train_one_epoch(loader, trainer, epoch, freezeout, masking.compute_loss,
                                      hooks=[recorder] if recorder else ())['loss'])
    return losses, masking.hits


def masking_model():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32)
    model.add_feature_heads('features')
    return model


def _ddp_worker(rank, world, port, state, out_path):
    with gloo_group(rank, world, port):
        model = masking_model()
        model.load_state_dict(state)
        recorder = GradRecorder(model)
        losses, _ = run_masking_epochs(model, world, rank, batch_size=2, recorder=recorder)
        if rank == 0:
            torch.save({'losses': losses, 'state': model.state_dict(), 'grads': recorder.grads}, out_path)


def test_two_gloo_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    model = masking_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ddp_worker, args=(2, free_port(), state, str(tmp_path / 'ddp.pt')), nprocs=2, join=True)
    ddp = torch.load(tmp_path / 'ddp.pt')
    recorder = GradRecorder(model)
    single, hits = run_masking_epochs(model, recorder=recorder)
    assert model.frozen_units == 10 and hits == 16 and len(recorder.grads) == 4
    assert_same_grads(ddp['grads'], recorder.grads)
    assert ddp['losses'] == pytest.approx(single, rel=1e-5)
    assert ddp['state'].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp['state'][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('flags,match', [(('--feature_masking',), '--how_scale'),
                                         (('--decoder_prune',), '--how_scale'),
                                         (('--how_scale', 'cubic', '--feature_target', 'both'), '--feature_masking'),
                                         (('--how_scale', 'cubic', '--feature_masking', '--freeze_cache'), 'one of')])
def test_bad_flag_combinations(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        run_pretrain.main(pretrain_args(tmp_path / 'unused', tmp_path / 'out', *flags))
