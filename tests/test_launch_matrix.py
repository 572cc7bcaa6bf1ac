"""Every entry script and model family as users launch them: 2 processes on gloo, one epoch of 2 optimizer
steps and a checkpoint, then the same command for 2 epochs, which must resume from that checkpoint.

Each run must build its DDP wrappers without `find_unused_parameters`, and both ranks must hold identical
parameters at every checkpoint (tests/launch_dump.py has each rank save its own). Demo data: 144 training
images (per-process batch 32 -> 2 steps per epoch) and 48 training videos.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, free_port
from util.data.demo_data import demo_imagefolder
from util.video.demo import make_demo_videos

pytestmark = pytest.mark.slow

IMAGE_RUN = '--data_path demo --device cpu --num_workers 0 --print_freq 1'
PRETRAIN = f'{IMAGE_RUN} --model MIM_vit_tiny_patch16 --input_size 32 --batch_size 32 --warmup_epochs 0 --vis_freq 0'
FINETUNE = (f'{IMAGE_RUN} --input_size 32 --batch_size 32 --warmup_epochs 0 --nb_classes 6 --aa none --reprob 0 '
            '--model vit_tiny_patch16')
SPARK = '--data_path=demo --device=cpu --num_workers=0 --input_size=64 --bs=64 --wp_ep=0 --vis_freq=0 --print_freq=1'
SLAK = (f'{IMAGE_RUN} --model SLaK_tiny --width_factor 0.25 --kernel_size 7 7 5 3 3 --Decom True --input_size 32 '
        '--batch_size 32 --warmup_epochs 0 --nb_classes 6 --aa none --reprob 0')
SCE = ('--data_path demo --device cpu --amp none --num_workers 0 --print_freq 1 --crop_size 32 --num_frames 4 '
       '--global_batch_size 24 --queue_size 48 --warmup_epochs 0')

# name: (launcher, script, flags, how the script names its epochs flag, output folder flag)
CASES = {
    'localmim': ('torchrun', 'run_pretrain.py', PRETRAIN, '--epochs', '--output_dir'),
    'freezeout': ('launch', 'run_pretrain.py', f'{PRETRAIN} --how_scale linear --t_0 0.2', '--epochs', '--output_dir'),
    'freeze_cache': ('launch', 'run_pretrain.py', f'{PRETRAIN} --how_scale linear --t_0 0.2 --freeze_cache',
                     '--epochs', '--output_dir'),
    'finetune_vit': ('launch', 'run_finetune.py', f'{FINETUNE} --dist_eval', '--epochs', '--output_dir'),
    'linprobe_vit': ('launch', 'run_finetune.py', f'{FINETUNE} --linprobe --cls_token', '--epochs', '--output_dir'),
    'finetune_resnet': ('launch', 'run_finetune.py', FINETUNE.replace('vit_tiny_patch16', 'resnet18'), '--epochs',
                        '--output_dir'),
    'spark_resnet': ('launch', 'main_spark.py', f'{SPARK} --model=resnet18', '--ep', '--exp_dir'),
    'spark_convnext': ('launch', 'main_spark.py', f'{SPARK} --model=convnext_atto', '--ep', '--exp_dir'),
    'spark_custom': ('launch', 'main_spark.py', f'{SPARK} --model=your_convnet', '--ep', '--exp_dir'),
    'slak_dense': ('torchrun', 'main_slak.py', SLAK, '--epochs', '--output_dir'),
    'slak_sparse': ('launch', 'main_slak.py', f'{SLAK} --sparse -u 1 --prune_rate 0.3', '--epochs',
                    '--output_dir'),
    'sce': ('launch', 'main_sce.py', SCE, '--epochs', '--output_dir'),
}
LAUNCHERS = {'launch': ['-m', 'torch.distributed.launch'], 'torchrun': ['-m', 'torch.distributed.run']}


@pytest.fixture(scope='module')
def demo_env(module_tmp):
    root = module_tmp / 'images'
    os.environ['DEMO_DATA_ROOT'], saved = str(root), os.environ.get('DEMO_DATA_ROOT')
    try:
        demo_imagefolder()  # built once here, not by two ranks at a time
        make_demo_videos()
    finally:
        if saved is None:
            del os.environ['DEMO_DATA_ROOT']
        else:
            os.environ['DEMO_DATA_ROOT'] = saved
    return {**os.environ, 'DEMO_DATA_ROOT': str(root), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def launch(case, epochs, out, dump, env):
    launcher, script, flags, epochs_flag, out_flag = CASES[case]
    dump.mkdir()
    cmd = [sys.executable, *LAUNCHERS[launcher], '--nproc_per_node=2', f'--master_port={free_port()}',
           str(REPO / 'tests' / 'launch_dump.py'), script, *flags.split(), f'{epochs_flag}={epochs}',
           f'{out_flag}={out}']
    done = subprocess.run(cmd, cwd=out.parent, env={**env, 'RANK_DUMP_DIR': str(dump)}, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, f'{" ".join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    dumps = {}
    for rank in (0, 1):
        for epoch in range(epochs):
            path = dump / f'rank{rank}_epoch{epoch}.pt'
            if path.exists():
                dumps[rank, epoch] = torch.load(path, weights_only=True)
    return dumps


def assert_ranks_agree(dumps, epoch):
    first, second = dumps[0, epoch], dumps[1, epoch]
    assert first['step'] == second['step']
    assert first['find_unused_parameters'] and not any(first['find_unused_parameters'])  # DDP, without the crutch
    assert first['params'].keys() == second['params'].keys()
    differ = [name for name, p in first['params'].items() if not torch.equal(p, second['params'][name])]
    assert not differ, f'ranks disagree after epoch {epoch} on {differ[:5]}'


@pytest.mark.parametrize('case', sorted(CASES))
def test_two_processes_train_checkpoint_and_resume(case, demo_env, tmp_path):
    out = tmp_path / 'out'
    first = launch(case, 1, out, tmp_path / 'dump1', demo_env)
    assert set(first) == {(0, 0), (1, 0)}
    assert_ranks_agree(first, 0)
    steps_per_epoch = first[0, 0]['step']
    assert steps_per_epoch >= 2
    if 'freeze' in case:  # units 0-4 freeze after the first step; DDP is re-wrapped around the active ones
        assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['extra']['frozen_units'] > 0
        assert len(first[0, 0]['find_unused_parameters']) > 1

    second = launch(case, 2, out, tmp_path / 'dump2', demo_env)
    assert set(second) == {(0, 1), (1, 1)}, 'the second launch must resume after epoch 0, not start over'
    assert_ranks_agree(second, 1)
    assert second[0, 1]['step'] == 2 * steps_per_epoch
    moved = [name for name, p in second[0, 1]['params'].items() if not torch.equal(p, first[0, 0]['params'][name])]
    assert moved, 'the resumed epoch did not train'
