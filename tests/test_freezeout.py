"""FreezeOut on LocalMIM: schedule formulas, what a freeze does, baseline equality, resume and DDP."""
import math

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

import models  # noqa: F401
import run_pretrain
from engine import masked_modeling_loss, train_one_epoch
from helpers import (GradRecorder, MIMWithPerSampleMask, assert_same_grads, free_port, gloo_group, image_data,
                     log_entries, pretrain_args, straight_and_resumed, write_images)
from util.checkpoint import LAST
from util.freezeout.schedule import FreezeOut, FreezeOutSchedule, pruned_stages, unit_parameters
from util.lr_sched import cosine_lr
from util.runtime import attach_ddp
from util.train_step import TrainStep


def test_schedule_matches_formulas():
    sched = FreezeOutSchedule(13, 'cubic', 0.8, epochs=100, warmup_epochs=10, base_lr=1e-3, min_lr=1e-6)
    t = [(0.8 + 0.2 * i / 12) ** 3 for i in range(12)] + [1.0]
    assert sched.t == pytest.approx(t, abs=1e-15) and sched.t[-1] == 1.0
    assert sched.freeze_at == pytest.approx([10 + ti * 90 for ti in t])
    assert sched.freeze_at[0] == pytest.approx(10 + 0.512 * 90)
    # warmup to the unit's own peak, then cosine to 0 at its freeze time; the last unit is the baseline
    assert sched.lr(3, 5.0) == pytest.approx(0.5e-3)
    f3 = sched.freeze_at[3]
    assert sched.lr(3, 30.0) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 20 / (f3 - 10))))
    assert sched.lr(3, f3) == 0.0
    for epoch in (0.0, 5.5, 10.0, 37.25, 99.9):
        assert sched.lr(12, epoch) == cosine_lr(epoch, 1e-3, 1e-6, 10, 100)
    epochs = (10.0, 55.9, 56.09, sched.freeze_at[5], 99.99, 100.0)
    assert [sched.frozen_units(e) for e in epochs] == [0, 0, 1, 6, 12, 12]  # the last unit never freezes
    scaled = FreezeOutSchedule(13, 'cubic', 0.8, 100, 10, 1e-3, 1e-6, scale_lr=True)
    assert scaled.lr(0, 10.0) == pytest.approx(1e-3 / 0.512) and scaled.lr(0, 5.0) == pytest.approx(0.5e-3 / 0.512)
    flat = FreezeOutSchedule(13, 'linear', 0.5, 100, 10, 1e-3, 1e-6, layerwise=False)
    assert flat.lr(0, 40.0) == cosine_lr(40.0, 1e-3, 1e-6, 10, 100) and flat.frozen_units(55.0) == 1
    squared = FreezeOutSchedule(13, 'squared', 0.8, 100, 10, 1e-3, 1e-6)
    assert squared.t == pytest.approx([(0.8 + 0.2 * i / 12) ** 2 for i in range(12)] + [1.0], abs=1e-15)
    with pytest.raises(ValueError, match='--t_0'):
        FreezeOutSchedule(13, 'cubic', 0.0, 100, 10, 1e-3, 0)


def test_t0_one_never_freezes_and_follows_baseline():
    sched = FreezeOutSchedule(13, 'cubic', 1.0, 100, 10, 1e-3, 1e-6)
    assert all(sched.frozen_units(e) == 0 for e in (0, 50, 99.99, 100.0))  # not even at the end of the run
    assert all(sched.lr(i, 42.5) == cosine_lr(42.5, 1e-3, 1e-6, 10, 100) for i in range(13))


def test_units_cover_every_trainable_parameter_and_stages_follow_their_block():
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32)
    units = unit_parameters(model)
    assert len(units) == 13
    names = [n for unit in units for n, _ in unit]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert {n for n, _ in units[0]} == {'cls_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    assert any(n.startswith('decoder.0.') for n, _ in units[2]) and any(n == 'norm.0.weight' for n, _ in units[2])
    assert any(n.startswith('decoder.3.') for n, _ in units[12])


def tiny_freezeout(t_0=0.3, epochs=3, how='linear'):
    torch.manual_seed(0)
    model = timm.create_model('MIM_vit_tiny_patch16', img_size=32)
    sched = FreezeOutSchedule(13, how, t_0, epochs=epochs, warmup_epochs=0, base_lr=1e-3, min_lr=0.0)
    return model, FreezeOut(model, sched)


def test_a_freeze_takes_units_out_of_training():
    model, freezeout = tiny_freezeout()
    opt = torch.optim.AdamW(freezeout.param_groups(0.05), lr=1e-3, fused=True)
    trainer = TrainStep(model, opt, 'cpu')
    imgs = torch.randn(4, 3, 32, 32)
    for _ in range(2):  # AdamW state for every unit
        freezeout.adjust(opt, 0.2)
        trainer.backward(model(imgs)[0])
        trainer.step()
    frozen_before = {n: p.detach().clone() for unit in freezeout.units[:4] for n, p in unit}
    freezeout.adjust(opt, 1.5)  # t_i <= 0.5 for units 0..3 (0.3 + 0.7 i / 12)
    assert model.frozen_units == 4 and model.active_stages() == [1, 2, 3]
    frozen_params = [p for unit in freezeout.units[:4] for _, p in unit]
    in_optimizer = {id(p) for g in opt.param_groups for p in g['params']}
    assert not any(id(p) in in_optimizer for p in frozen_params)
    assert not any(p in opt.state for p in frozen_params)
    assert {g['unit'] for g in opt.param_groups} == set(range(4, 13))
    prefix, _, _ = model.forward_prefix(imgs, 0.75)
    assert not prefix.requires_grad
    for _ in range(3):
        loss, logs = model(imgs)
        assert set(logs) == {'loss_scale2', 'loss_scale1', 'loss_scale0.5'}  # stage 0 reads block 1: frozen
        trainer.backward(loss)
        assert all(p.grad is None and not p.requires_grad for p in frozen_params)
        trainer.step()
    assert all(torch.equal(frozen_before[n], p) for unit in freezeout.units[:4] for n, p in unit)
    assert freezeout.metrics() == {'active_units': 9, 'frozen_depth': 4}


def test_a_pruning_freeze_drops_the_frozen_stages_decoders_and_says_what_it_froze(capsys):
    model, _ = tiny_freezeout()
    sched = FreezeOutSchedule(13, 'linear', 0.3, epochs=3, warmup_epochs=0, base_lr=1e-3, min_lr=0.0)
    freezeout = FreezeOut(model, sched, prune=True)
    opt = torch.optim.AdamW(freezeout.param_groups(0.05), lr=1e-3)
    lr = freezeout.adjust(opt, 1.5)
    assert lr == sched.lr(12, 1.5) == cosine_lr(1.5, 1e-3, 0.0, 0, 3)  # the logged lr: the last unit's, the baseline's
    assert 'FreezeOut: froze units 0..3; 9 of 13 units train' in capsys.readouterr().out
    assert pruned_stages(model) == [0] and not any(k.startswith('decoder.0.') for k in model.state_dict())
    kept = {id(p) for p in model.parameters()}
    assert all(id(p) in kept for unit in freezeout.units for _, p in unit)


class RecordFrozen(MIMWithPerSampleMask):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, mask_ratio=0.75):
        self.seen.append(self.mim.frozen_units)
        return super().forward(x, mask_ratio)


def test_freeze_events_only_at_accumulation_window_starts():
    torch.manual_seed(0)
    model = RecordFrozen()
    sched = FreezeOutSchedule(13, 'linear', 0.1, epochs=1, warmup_epochs=0, base_lr=1e-3, min_lr=0.0)
    freezeout = FreezeOut(model.mim, sched)
    opt = torch.optim.AdamW(freezeout.param_groups(0.05), lr=1e-3, fused=True)
    trainer = TrainStep(model, opt, 'cpu', accum_iter=3)
    loader = DataLoader(image_data(24), batch_size=2)  # 12 micro-steps, 4 windows of 3
    train_one_epoch(loader, trainer, 0, freezeout, masked_modeling_loss(0.75))
    windows = [model.seen[i:i + 3] for i in range(0, 12, 3)]
    assert all(len(set(w)) == 1 for w in windows)
    assert [w[0] for w in windows] == [sched.frozen_units(s / 12) for s in (0, 3, 6, 9)]
    assert 0 < windows[1][0] < windows[2][0] < windows[3][0]


def test_t0_one_is_the_baseline_bit_for_bit(tmp_path):
    data = write_images(tmp_path / 'flat', 8)
    run_pretrain.main(pretrain_args(data, tmp_path / 'base', '--num_workers', '0'))
    run_pretrain.main(pretrain_args(data, tmp_path / 'fo', '--num_workers', '0', '--how_scale', 'cubic', '--t_0', '1'))
    a = torch.load(tmp_path / 'base' / LAST, weights_only=True)
    b = torch.load(tmp_path / 'fo' / LAST, weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert [e['train_loss'] for e in log_entries(tmp_path / 'base')] == \
        [e['train_loss'] for e in log_entries(tmp_path / 'fo')]


def test_resume_across_a_freeze_equals_uninterrupted(tmp_path):
    data = write_images(tmp_path / 'flat', 8)  # 2 steps per epoch; units 0..3 freeze in epoch 1, 4..9 in epoch 2
    flags = ('--epochs', '3', '--warmup_epochs', '0', '--how_scale', 'linear', '--t_0', '0.3', '--num_workers', '0')
    straight, resumed = straight_and_resumed(run_pretrain, lambda out: pretrain_args(data, out, *flags), 2, tmp_path)
    a = torch.load(straight / LAST, weights_only=True)
    b = torch.load(resumed / LAST, weights_only=True)
    assert a['extra']['frozen_units'] == b['extra']['frozen_units'] == 10
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    logs = log_entries(straight)
    assert [e['active_units'] for e in logs] == [13, 9, 3]
    assert [e['train_loss'] for e in logs] == [e['train_loss'] for e in log_entries(resumed)]
    with pytest.raises(ValueError, match='same --how_scale'):  # a FreezeOut checkpoint needs FreezeOut to resume
        run_pretrain.main(pretrain_args(data, straight, '--epochs', '4', '--num_workers', '0'))


def run_freezeout_epochs(model, world=1, rank=0, batch_size=4, recorder=None):
    """Plain SGD (FreezeOut's per-unit lrs, no momentum): a wrong gradient scale reaches the weights."""
    sched = FreezeOutSchedule(13, 'linear', 0.3, epochs=3, warmup_epochs=0, base_lr=0.05, min_lr=0.0)
    freezeout = FreezeOut(model.mim, sched)
    opt = torch.optim.SGD(freezeout.param_groups(0.0), lr=0.05)
    trainer = TrainStep(model, opt, 'cpu', accum_iter=2)
    attach_ddp(trainer, torch.device('cpu'), freezeout)  # under a process group: DDP, rewrapped at each freeze
    data = image_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    losses = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        losses.append(train_one_epoch(loader, trainer, epoch, freezeout, masked_modeling_loss(0.75),
                                      hooks=[recorder] if recorder else ())['loss'])
    return losses


def _ddp_freeze_worker(rank, world, port, state, out_path):
    with gloo_group(rank, world, port):
        model = MIMWithPerSampleMask()
        model.load_state_dict(state)
        recorder = GradRecorder(model)
        losses = run_freezeout_epochs(model, world, rank, batch_size=2, recorder=recorder)
        if rank == 0:
            torch.save({'losses': losses, 'state': model.state_dict(), 'frozen': model.mim.frozen_units,
                        'grads': recorder.grads}, out_path)


def test_ddp_across_freeze_events_matches_one_process(tmp_path):
    """The all-reduced gradients of 2 processes equal one process's at every step, across the freezes (this test's
    re-wrap is run_pretrain's, util.runtime.attach_ddp)."""
    torch.manual_seed(0)
    model = MIMWithPerSampleMask()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ddp_freeze_worker, args=(2, free_port(), state, str(tmp_path / 'ddp.pt')), nprocs=2, join=True)
    ddp = torch.load(tmp_path / 'ddp.pt')
    recorder = GradRecorder(model)
    single = run_freezeout_epochs(model, recorder=recorder)
    assert ddp['frozen'] == model.mim.frozen_units > 0
    assert len(recorder.grads) == 6 and recorder.grads[-1][0] is None  # frozen: no gradient
    assert_same_grads(ddp['grads'], recorder.grads)
    assert ddp['losses'] == pytest.approx(single, rel=1e-5)
    assert max((v - state[k]).abs().max().item() for k, v in model.state_dict().items()) > 1e-2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp['state'][k], v, rtol=1e-5, atol=1e-6)


# FreezeOut pretraining command lines in use (ImageNet runs and a debug run), as given after `run_pretrain.py`
FREEZEOUT_REFERENCE_COMMANDS = [
    ('--epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 4 --accum_iter 2 '
     '--model MIM_vit_base_patch16 --data_path /raid/utku/datasets/imagenet/classification/train/image_folders '
     '--output_dir full_pretrain_out_freezeout_linear_t0_5 --log_dir full_pretrain_out_freezeout_linear_t0_5 '
     '--how_scale linear --t_0 0.5', dict(how_scale='linear', t_0=0.5, accum_iter=2, batch_size=256)),
    ('--epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 8 --accum_iter 1 '
     '--model MIM_vit_base_patch16 --data_path /raid/utku/datasets/imagenet/classification/train/image_folders '
     '--output_dir full_pretrain_out_freezeout_cubic_t0_8_fast --log_dir full_pretrain_out_freezeout_cubic_t0_8_fast '
     '--how_scale cubic --t_0 0.8', dict(how_scale='cubic', t_0=0.8, world_size=8)),
    ('--epochs 3 --batch_size 2 --warmup_epochs 0 --blr 2e-4 --world_size 4 --accum_iter 1 --model MIM_vit_base_patch16 '
     '--data_path /raid/utku/datasets/imagenet/classification/train/demo_dataset --output_dir debug --log_dir debug '
     '--how_scale linear --t_0 0.5', dict(epochs=3, batch_size=2, warmup_epochs=0, how_scale='linear')),
    ('--epochs 100 --batch_size 128 --warmup_epochs 10 --blr 2e-4 --world_size 2 --accum_iter 4 '
     '--model MIM_vit_base_patch16 --data_path /raid/utku/datasets/imagenet/classification/train/image_folders '
     '--output_dir full_pretrain_out_freezeout_cubic_t0_8_fast --log_dir full_pretrain_out_freezeout_cubic_t0_8_fast '
     '--how_scale cubic --t_0 0.8', dict(batch_size=128, accum_iter=4, how_scale='cubic', t_0=0.8)),
]


@pytest.mark.parametrize('line,expected', FREEZEOUT_REFERENCE_COMMANDS)
def test_freezeout_reference_commands_parse(line, expected):
    args = run_pretrain.get_args_parser().parse_args(line.split() + ['--local-rank=0'])
    assert all(getattr(args, k) == v for k, v in expected.items())
    assert not args.scale_lr and not args.non_layerwise_lr


def test_freezeout_wd_sets_the_decayed_groups(tmp_path, monkeypatch):
    """ViTFreeze's units decayed at 1e-5 (its param-group builder's default); --freezeout_wd reproduces that,
    and without it every decayed group carries --weight_decay. Biases and norms (1-D) never decay."""
    made = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, 'AdamW', RecordedAdamW)
    data = write_images(tmp_path / 'flat', 4)
    for name, extra, decay in (('wd', ['--how_scale', 'cubic', '--freezeout_wd', '1e-5'], 1e-5),
                               ('default', ['--how_scale', 'cubic'], 0.05), ('baseline', [], 0.05)):
        run_pretrain.main(pretrain_args(data, tmp_path / name, '--epochs', '1', '--warmup_epochs', '0',
                                        '--weight_decay', '0.05', '--num_workers', '0', *extra))
        optimizer = made.pop()
        wds = [(g['weight_decay'], p.ndim) for g in optimizer.param_groups for p in g['params']]
        assert {wd for wd, ndim in wds if ndim <= 1} == {0.0}
        assert {wd for wd, ndim in wds if ndim > 1} == {decay}
        saved = torch.load(tmp_path / name / LAST, weights_only=True)['optimizer']['param_groups']
        assert {g['weight_decay'] for g in saved} == {0.0, decay}


def test_freezeout_wd_needs_freezeout(tmp_path):
    with pytest.raises(ValueError, match='--freezeout_wd'):
        run_pretrain.main(pretrain_args(tmp_path / 'unused', tmp_path / 'out', '--freezeout_wd', '1e-5'))
