"""--clip_grad in fp32 through each entry script's own trainer (the official SLaK ignored it without AMP):
the gradients the optimizer steps on have the clip value as their total norm, and without the flag they keep
their (larger) raw norm."""
import pytest
import torch

import main_slak
import run_finetune
import run_pretrain
from helpers import finetune_args, pretrain_args, slak_args, write_images
from util.train_step import TrainStep

pytestmark = pytest.mark.usefixtures('one_thread')


class FirstStepDone(Exception):
    pass


def first_step_norms(monkeypatch, script):
    """Replaces `script.TrainStep` by one that records, on the first optimizer step, the configured clip, the
    total norm before clipping (`grad_norm`) and the norm of the gradients the optimizer stepped on, then stops."""
    seen = []

    class Probe:
        def after_step(self, trainer):  # gradients are zeroed only after the hooks
            grads = [p.grad for p in trainer._params_with_grad()]
            seen.append((trainer.clip_grad, trainer.amp_dtype, float(trainer.grad_norm),
                         float(torch.nn.utils.get_total_norm(grads))))

    class FirstStepOnly(TrainStep):
        def step(self, hooks=()):
            super().step(hooks=(Probe(), *hooks))
            raise FirstStepDone

    monkeypatch.setattr(script, 'TrainStep', FirstStepOnly)
    return seen


def check_norms(seen, clip):
    (configured, amp_dtype, raw, stepped), = seen
    assert raw > 2 * CLIP  # clipping changes these gradients measurably
    if clip is None:
        assert stepped == pytest.approx(raw, rel=1e-5)
    else:
        assert stepped == pytest.approx(CLIP, rel=1e-5)
    assert configured == clip and amp_dtype is None  # fp32


CLIP = 0.05


@pytest.fixture(scope='module')
def demo_root(module_tmp):
    mp = pytest.MonkeyPatch()
    root = module_tmp
    mp.setenv('DEMO_DATA_ROOT', str(root / 'demo'))
    yield root
    mp.undo()


def clip_flags(clip):
    return [] if clip is None else ['--clip_grad', str(clip)]


@pytest.mark.parametrize('clip', [None, CLIP])
def test_run_pretrain_clips_in_fp32(tmp_path, monkeypatch, clip):
    seen = first_step_norms(monkeypatch, run_pretrain)
    data = write_images(tmp_path / 'flat', 4)
    with pytest.raises(FirstStepDone):
        run_pretrain.main(pretrain_args(data, tmp_path / 'out', '--num_workers', '0', *clip_flags(clip)))
    check_norms(seen, clip)


@pytest.mark.parametrize('clip', [None, CLIP])
def test_run_finetune_clips_in_fp32(tmp_path, monkeypatch, demo_root, clip):
    seen = first_step_norms(monkeypatch, run_finetune)
    with pytest.raises(FirstStepDone):
        run_finetune.main(finetune_args(tmp_path / 'out', *clip_flags(clip)))
    check_norms(seen, clip)


@pytest.mark.parametrize('clip', [None, CLIP])
def test_main_slak_clips_in_fp32(tmp_path, monkeypatch, demo_root, clip):
    seen = first_step_norms(monkeypatch, main_slak)
    with pytest.raises(FirstStepDone):
        main_slak.main(slak_args(tmp_path / 'out', '--use_amp', 'false', *clip_flags(clip)))
    check_norms(seen, clip)
