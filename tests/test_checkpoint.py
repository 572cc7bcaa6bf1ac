"""util/checkpoint.py files as the official LocalMIM / MAE resume reads them, and the fp16 GradScaler state."""
import glob
import os

import pytest
import torch
from timm.optim import param_groups_weight_decay

import run_pretrain
from helpers import pretrain_args, write_images
from official_files import localmim_pretrain_checkpoint, stepped_adamw
from util.checkpoint import LAST, load_checkpoint, read_checkpoint, save_checkpoint
from util.train_step import TrainStep


class OfficialNativeScaler:
    """NativeScalerWithGradNormCount of LocalMIM's / MAE's util/misc.py, reduced to its state: it wraps an
    enabled fp16 GradScaler (theirs is torch.cuda.amp.GradScaler() on a GPU; the CPU one behaves the same)."""
    state_dict_key = 'amp_scaler'

    def __init__(self):
        self._scaler = torch.amp.GradScaler('cpu')

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        self._scaler.load_state_dict(state_dict)


def official_auto_load_model(output_dir, model, optimizer, loss_scaler, resume=''):
    """LocalMIM's util/misc.py `auto_load_model` (MAE's `load_model` is its second half): the newest
    checkpoint-<N>.pth, strict model load, then optimizer, epoch and `if 'scaler' in checkpoint`."""
    if not resume:
        latest = -1
        for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
            suffix = path.split('-')[-1].split('.')[0]
            if suffix.isdigit():
                latest = max(int(suffix), latest)
        if latest >= 0:
            resume = os.path.join(output_dir, f'checkpoint-{latest}.pth')
    checkpoint = torch.load(resume, map_location='cpu')
    model.load_state_dict(checkpoint['model'])
    if 'optimizer' in checkpoint and 'epoch' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if 'scaler' in checkpoint:
            loss_scaler.load_state_dict(checkpoint['scaler'])
        return checkpoint['epoch'] + 1
    return 0


def official_optimizer(model, args):
    return torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))


def test_official_resume_reads_our_checkpoints_and_fp16_keeps_its_scale(tmp_path):
    data = write_images(tmp_path / 'flat', 8)
    for amp in ('none', 'bf16'):  # no GradScaler: the official resume must start a fresh one
        args = pretrain_args(data, tmp_path / amp, '--epochs', '1', '--num_workers', '0', '--amp', amp)
        run_pretrain.main(args)
        ours = torch.load(tmp_path / amp / 'checkpoint-0.pth', weights_only=True)
        model = run_pretrain.build_model(args)
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=args.lr,
                                      betas=(0.9, 0.95))
        loss_scaler = OfficialNativeScaler()
        assert official_auto_load_model(str(tmp_path / amp), model, optimizer, loss_scaler) == 1
        assert all(torch.equal(v, ours['model'][k]) for k, v in model.state_dict().items())
        assert optimizer.state_dict()['state'][0]['step'] == 2  # 8 images / 4 per step
        assert loss_scaler.state_dict() == OfficialNativeScaler().state_dict()

    def fp16_trainer():
        model = torch.nn.Linear(4, 2)
        return TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), 'cpu', amp='fp16')

    saved = fp16_trainer()
    saved.backward(saved.model(torch.randn(3, 4)).square().mean())
    saved.step()
    saved.scaler.update(new_scale=512.0)  # as after a few overflows
    out = tmp_path / 'fp16'
    out.mkdir()
    save_checkpoint(str(out), 3, 7, pretrain_args(data, out), saved.model, saved.optimizer, saved.scaler, keep=True)
    restored = fp16_trainer()
    load_checkpoint(str(out / LAST), restored.model, restored.optimizer, restored.scaler)
    assert restored.scaler.get_scale() == 512.0
    official = OfficialNativeScaler()
    model = torch.nn.Linear(4, 2)
    assert official_auto_load_model(str(out), model, torch.optim.AdamW(model.parameters()), official) == 4
    assert official.state_dict()['scale'] == 512.0


def test_atomic_save_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from util import checkpoint
    path = tmp_path / LAST
    checkpoint.atomic_save({'epoch': 1, 'w': torch.arange(4)}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):  # a crash (disk full, kill) in the middle of the write
        f.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(OSError, match='disk full'):
        checkpoint.atomic_save({'epoch': 2, 'w': torch.arange(8)}, str(path))
    monkeypatch.setattr(torch, 'save', real_save)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)['epoch'] == 1
    assert sorted(os.listdir(tmp_path)) == [LAST]  # no temporary file left behind
    checkpoint.atomic_save({'epoch': 2}, str(path))  # and a later save replaces the file
    assert torch.load(path, weights_only=True)['epoch'] == 2 and sorted(os.listdir(tmp_path)) == [LAST]


def test_official_localmim_checkpoint_resumes_and_trains_an_epoch(tmp_path, capsys):
    """A checkpoint of the official pretraining (torch 1.x optimizer groups, int steps, fp16 scaler, Namespace args)
    resumes: its weights and Adam moments are used, and the fused AdamW steps on (it failed with `Expected grad_scale
    and found_inf to be None` when the options the file lacks were left None)."""
    data = write_images(tmp_path / 'flat', 8)
    args = pretrain_args(data, tmp_path / 'out', '--epochs', '2', '--num_workers', '0')
    model = run_pretrain.build_model(args)
    steps_before = 3
    official = stepped_adamw(model, param_groups_weight_decay(model, args.weight_decay), steps_before, lr=1e-3,
                             betas=(0.9, 0.95))
    saved = tmp_path / 'official' / 'checkpoint-0.pth'
    saved.parent.mkdir()
    localmim_pretrain_checkpoint(saved, model, official, 0, model='MIM_vit_tiny_patch16', input_size=32,
                                 batch_size=4, blr=1e-3, weight_decay=args.weight_decay)
    assert not {'fused', 'foreach', 'capturable'} & set(read_checkpoint(str(saved))['optimizer']['param_groups'][0])
    args.resume = str(saved)
    run_pretrain.main(args)
    assert f'resumed from {saved} (epoch 0 done' in capsys.readouterr().out
    ckpt = torch.load(tmp_path / 'out' / LAST, weights_only=True)
    assert ckpt['epoch'] == 1
    state = ckpt['optimizer']
    assert all(g['fused'] is True for g in state['param_groups'])
    # its Adam moments went on counting: 3 official steps + 2 of ours (8 images / 4 per step)
    assert {float(s['step']) for s in state['state'].values()} == {steps_before + 2.0}
    moved = [k for k, v in ckpt['model'].items() if not torch.equal(v, model.state_dict()[k])]
    assert 'blocks.0.attn.qkv.weight' in moved


def test_optimizer_state_of_another_kind_or_size_is_one_clear_line(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    sgd.step()
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'optimizer': sgd.state_dict(), 'epoch': 0}, path)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r'the optimizer state keeps momentum_buffer per parameter, this run\'s '
                                         r'AdamW needs exp_avg, exp_avg_sq, step; was it saved with another '
                                         r'optimizer \(--opt\)\?'):
        load_checkpoint(str(path), model, adamw)
    two_groups = torch.optim.SGD([{'params': model[0].parameters()}, {'params': model[1].parameters()}], lr=0.1,
                                 momentum=0.9)
    with pytest.raises(ValueError, match='the optimizer state has 1 param groups, this run 2'):
        load_checkpoint(str(path), model, two_groups)
    fewer = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match='optimizer group 0 has 4 parameters, this run 2'):
        load_checkpoint(str(path), model, fewer)
