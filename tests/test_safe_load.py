"""Checkpoint files from elsewhere are read without running their code (util/safe_load.py), and each unreadable
file gets a message that says what is wrong with it."""
import collections
import io
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from helpers import REPO
from util.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from util.safe_load import Foreign, foreign_names, safe_load


class RunsACommand:
    """What a malicious checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f'open({str(self.marker)!r}, "w")',)


@pytest.fixture()
def malicious(tmp_path):
    marker = tmp_path / 'it_ran'
    path = tmp_path / 'weights.pth'
    torch.save({'model': {'w': torch.zeros(2)}, 'payload': RunsACommand(marker)}, path)
    return path, marker


def test_a_file_that_runs_a_command_is_refused_without_running_it(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(str(path))
    assert str(error.value) == (f'{path} was refused: unpickling it would call posix.system (a file that runs code '
                                f'when loaded); nothing from it was run or loaded')
    assert not marker.exists()
    python = tmp_path / 'python.pth'
    torch.save([RunsPython(marker)], python)
    with pytest.raises(CheckpointError, match='would call builtins.eval'):
        read_checkpoint(str(python))
    assert not marker.exists()


FINETUNE = ['--data_path', 'demo', '--model', 'vit_tiny_patch16', '--input_size', '32', '--device', 'cpu',
            '--nb_classes', '6', '--epochs', '1', '--num_workers', '0', '--output_dir', 'out', '--finetune']


@pytest.mark.parametrize('script,flags', [('run_finetune.py', FINETUNE),
                                          ('export.py', ['--format', 'timm', '--out', 'never.pth'])])
def test_fine_tuning_or_exporting_a_malicious_file_is_one_line(malicious, tmp_path, script, flags):
    """These readers used to retry with weights_only=False, which ran the command."""
    path, marker = malicious
    argv = [*flags, str(path)] if script == 'run_finetune.py' else [str(path), *flags]
    result = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, 'DEMO_DATA_ROOT': str(tmp_path / 'demo')})
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f'{path} was refused: unpickling it would call posix.system' in errors[0]
    assert not marker.exists() and not (tmp_path / 'never.pth').exists()


def test_unknown_classes_become_inert_data_without_import_or_call(tmp_path, monkeypatch):
    """A class of a package the reader does not have (or has: it is not imported either) is kept as its name and
    pickled data; none of its methods runs."""
    module = types.ModuleType('someones_package.config')
    calls = []

    class Config:
        def __init__(self, **values):
            self.values = values

        def __setstate__(self, state):
            calls.append('setstate')
            self.__dict__.update(state)

    class Point:  # pickled as a call: Point(3, 4)
        def __init__(self, x, y):
            calls.append('init')
            self.x, self.y = x, y

        def __reduce__(self):
            return Point, (self.x, self.y)

    for cls in (Config, Point):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, 'someones_package', types.ModuleType('someones_package'))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / 'with_config.pth'
    torch.save({'state_dict': {'w': torch.ones(3)}, 'hyper_parameters': {'cfg': Config(lr=0.1, depth=[1, 2])},
                'hparams_type': Config, 'origin': Point(3, 4)}, path)
    calls.clear()
    ckpt = read_checkpoint(str(path))
    assert calls == []
    assert ckpt['origin'].qualname == 'someones_package.config.Point' and ckpt['origin'].args == (3, 4)
    cfg = ckpt['hyper_parameters']['cfg']
    assert isinstance(cfg, Foreign) and cfg.qualname == 'someones_package.config.Config'
    assert cfg.state == {'values': {'lr': 0.1, 'depth': [1, 2]}} and torch.equal(ckpt['state_dict']['w'], torch.ones(3))
    assert foreign_names(ckpt) == ['someones_package.config.Config', 'someones_package.config.Point']
    assert repr(cfg) == '<someones_package.config.Config: not imported>'


def _legacy_with_numpy1_names(obj):
    """A torch < 1.6 (non-zip) file as numpy 1.x pickles its scalars: numpy.core.multiarray.scalar."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    assert b'numpy._core.multiarray' in data
    return data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')


@pytest.mark.parametrize('layout', ['zip', 'legacy_numpy1'])
def test_numpy_scalars_become_python_numbers(tmp_path, layout):
    values = {'lr': np.float64(0.004) * 0.7, 'weight_decay': np.float64(0.05), 'steps': np.int64(7),
              'half': np.float32(0.25), 'flag': np.bool_(True), 'w': torch.arange(3.0)}
    path = tmp_path / 'numpy.pth'
    if layout == 'zip':
        torch.save(values, path)
    else:
        path.write_bytes(_legacy_with_numpy1_names(values))
    ckpt = safe_load(str(path))
    assert {k: (type(v), v) for k, v in ckpt.items() if k != 'w'} == {
        'lr': (float, 0.004 * 0.7), 'weight_decay': (float, 0.05), 'steps': (int, 7), 'half': (float, 0.25),
        'flag': (bool, True)}
    assert torch.equal(ckpt['w'], torch.arange(3.0))


def test_messages_say_what_is_wrong(tmp_path):
    model = torch.nn.Linear(3, 2)
    whole = tmp_path / 'whole_model.pth'
    torch.save(model, whole)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(str(whole))
    assert str(error.value) == (f'{whole} holds a pickled torch.nn.modules.linear.Linear object, not a checkpoint '
                                f'dict (a whole model saved with torch.save(model)? save its state_dict())')
    tensor = tmp_path / 'tensor.pth'
    torch.save(torch.ones(2), tensor)
    with pytest.raises(CheckpointError, match=f'^{tensor} holds a Tensor, not a checkpoint dict$'):
        read_checkpoint(str(tensor))
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights')
    with pytest.raises(CheckpointError, match=f"^{text} cannot be read: neither a zip archive nor a pickle, it starts "
                                              f"with b'thes': damaged, or not a checkpoint$"):
        read_checkpoint(str(text))
    other_pickle = tmp_path / 'plain.pkl'
    other_pickle.write_bytes(pickle.dumps({'model': {'w': np.zeros(2)}}, protocol=2))  # detectron2's format
    with pytest.raises(CheckpointError, match=f'^{other_pickle} cannot be read: a pickle not written by torch.save '
                                              r'\(e.g. a detectron2 .pkl\): not a checkpoint$'):
        read_checkpoint(str(other_pickle))


def test_a_dict_subclass_filled_item_by_item_is_refused_naming_it(tmp_path):
    """torch's restricted unpickler fills only plain dicts; the file is refused, not loaded half-way."""
    path = tmp_path / 'counts.pth'
    torch.save({'model': {}, 'counts': collections.defaultdict(int, {'a': 1})}, path)
    with pytest.raises(CheckpointError, match=f"^{path} cannot be read: it holds Python objects that cannot be rebuilt "
                                              f"without running their code: Can only SETITEMS? for dict, .* but got "
                                              f"<class 'collections.defaultdict'>$"):
        read_checkpoint(str(path))


def test_a_checkpoint_of_another_model_names_what_it_holds(tmp_path):
    slak = {'downsample_layers.0.0.weight': torch.zeros(4, 3, 4, 4),
            'stages.0.0.large_kernel.LoRA1.conv.weight': torch.zeros(4, 1, 7, 3)}
    path = tmp_path / 'slak.pth'
    torch.save({'model': slak, 'epoch': 3}, path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(str(path), torch.nn.Linear(3, 2))
    message = str(error.value)
    assert message.startswith(f'checkpoint {path} does not fit this model: it holds a SLaK ConvNet (2 tensors, first '
                              f'downsample_layers.0.0.weight, stages.0.0.large_kernel.LoRA1.conv.weight), this run '
                              f'builds a Linear (')
    assert '\n' not in message
