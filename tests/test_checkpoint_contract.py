"""util/checkpoint.py's smaller promises: the args a checkpoint stores load without running code, `extra` comes
back, released-weights URLs are downloaded once to torch.hub's folder, a model that does not fit is refused, CUDA
RNG states are restored, and saving works inside a process group (here of one process, in this process)."""
import argparse
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from util.checkpoint import (NonFiniteStateError, load_checkpoint, no_readable_checkpoint, plain_args, read_checkpoint,
                             rng_state, save_checkpoint, set_rng_state, what_model)


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_args_are_stored_as_plain_values():
    args = argparse.Namespace(path=Path('data'), device=torch.device('cpu'), sizes=[1, 2], scale=(0.5, 1.0),
                              paths=[Path('a')], flag=None, name='vit')
    assert plain_args(args) == {'path': 'data', 'device': 'cpu', 'sizes': [1, 2], 'scale': (0.5, 1.0),
                                'paths': "[PosixPath('a')]", 'flag': None, 'name': 'vit'}


def test_extra_comes_back_and_the_args_load_safely(tmp_path):
    model, optimizer = model_and_optimizer()
    save_checkpoint(str(tmp_path), 3, 7, argparse.Namespace(data=Path('x')), model, optimizer,
                    extra={'best_acc1': 71.5})
    ckpt = read_checkpoint(str(tmp_path / 'checkpoint-last.pth'))  # weights_only: a Path would be refused
    assert ckpt['extra'] == {'best_acc1': 71.5} and ckpt['args'] == {'data': 'x'} and (ckpt['epoch'], ckpt['step']) \
        == (3, 7)


def test_the_no_readable_checkpoint_error_names_the_resume_flag():
    message = str(no_readable_checkpoint('out', ['out/checkpoint-last.pth']))
    assert 'resume another file with --resume FILE' in message
    assert 'with --finetune FILE' in str(no_readable_checkpoint('out', [], resume_flag='--finetune'))


def test_a_url_is_downloaded_once_into_torch_hubs_checkpoints(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer()
    save_checkpoint(str(tmp_path), 0, 0, argparse.Namespace(), model, optimizer)
    downloads = []

    def download(url, path):
        downloads.append((url, path))
        shutil.copy(tmp_path / 'checkpoint-last.pth', path)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    url = 'https://example.org/releases/v1/weights.pth?raw=1'
    for _ in range(2):
        other, _ = model_and_optimizer(seed=1)
        load_checkpoint(url, other)
        assert torch.equal(other.weight, model.weight)
    assert downloads == [(url, str(tmp_path / 'hub' / 'checkpoints' / 'weights.pth'))]


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer = model_and_optimizer()
    save_checkpoint(str(tmp_path), 0, 0, argparse.Namespace(), model, optimizer)
    with pytest.raises(ValueError, match='does not fit this model'):
        load_checkpoint(str(tmp_path / 'checkpoint-last.pth'), nn.Sequential(nn.Linear(3, 2)))


def test_errors_name_the_kind_of_model_a_state_dict_holds():
    one = torch.zeros(1)
    assert what_model({'trunk.model.stem.0.weight': one}) == \
        'an SCE video model (R3D-18) (1 tensors, first trunk.model.stem.0.weight)'
    assert what_model({'module.cls_token': one, 'module.patch_embed.proj.weight': one}) == \
        'a ViT (2 tensors, first cls_token, patch_embed.proj.weight)'
    assert what_model({'fc.weight': one}) == 'an unknown model (1 tensors, first fc.weight)'
    assert what_model({'decoder_embed.weight': one, 'patch_embed.proj.weight': one}).startswith(
        'an MAE pretraining ViT (2 tensors')


def test_cuda_rng_states_are_restored_where_the_devices_match(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.append)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: ['gpu0', 'gpu1'])
    state = rng_state()
    assert state['cuda'] == ['gpu0', 'gpu1']
    set_rng_state(state)
    set_rng_state(dict(state, cuda=['gpu0']))  # saved on another number of GPUs: left alone
    assert restored == [['gpu0', 'gpu1']]


def test_save_and_resume_inside_a_process_group(tmp_path, one_process_group):
    model, optimizer = model_and_optimizer()
    save_checkpoint(str(tmp_path), 1, 2, argparse.Namespace(), model, optimizer)
    assert len(read_checkpoint(str(tmp_path / 'checkpoint-last.pth'))['rng']) == 1  # one state per rank
    other, other_optimizer = model_and_optimizer(seed=1)
    load_checkpoint(str(tmp_path / 'checkpoint-last.pth'), other, other_optimizer)
    assert torch.equal(other.weight, model.weight)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteStateError, match=r'weight holds NaN or inf'):
        save_checkpoint(str(tmp_path), 2, 3, argparse.Namespace(), model, optimizer)
