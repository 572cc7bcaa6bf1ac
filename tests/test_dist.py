"""Launcher detection: torchrun / torch.distributed.launch, SLURM srun, OpenMPI, plain python."""
import argparse
import os

import pytest

from util.dist import _launcher_env, init_distributed_mode

LAUNCH_VARS = ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS',
               'SLURM_LOCALID', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST', 'SLURM_LAUNCH_NODE_IPADDR',
               'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK']


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No launcher variables during a test, and none left behind (the code under test exports RANK etc.)."""
    saved = dict(os.environ)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def args(**kw):
    return argparse.Namespace(**{'dist_on_itp': False, 'local_rank': -1, 'device': 'cpu', 'dist_url': 'env://', **kw})


def test_plain_python_is_not_distributed():
    a = args()
    assert _launcher_env(a) is None
    init_distributed_mode(a)
    assert (a.distributed, a.rank, a.world_size) == (False, 0, 1)


def test_torchrun_environment(clean_env):
    clean_env.setenv('RANK', '5')
    clean_env.setenv('WORLD_SIZE', '8')
    clean_env.setenv('LOCAL_RANK', '1')
    assert _launcher_env(args()) == (5, 8, 1)


def test_distributed_launch_local_rank_flag_when_env_lacks_it(clean_env):
    clean_env.setenv('RANK', '2')
    clean_env.setenv('WORLD_SIZE', '4')
    assert _launcher_env(args(local_rank=2)) == (2, 4, 2)


def test_slurm_srun(clean_env):
    clean_env.setenv('SLURM_PROCID', '3')
    clean_env.setenv('SLURM_NTASKS', '4')
    clean_env.setenv('SLURM_LOCALID', '1')
    clean_env.setenv('SLURM_LAUNCH_NODE_IPADDR', '10.0.0.7')
    assert _launcher_env(args()) == (3, 4, 1)
    assert os.environ['RANK'] == '3' and os.environ['WORLD_SIZE'] == '4' and os.environ['MASTER_PORT'] == '29500'
    assert os.environ['MASTER_ADDR'] == '10.0.0.7'  # no node list to ask scontrol about


def test_single_task_slurm_job_runs_undistributed(clean_env):
    clean_env.setenv('SLURM_PROCID', '0')
    clean_env.setenv('SLURM_NTASKS', '1')
    assert _launcher_env(args()) is None


def test_openmpi(clean_env):
    for k, v in {'RANK': '1', 'SIZE': '2', 'LOCAL_RANK': '1'}.items():
        clean_env.setenv(f'OMPI_COMM_WORLD_{k}', v)
    assert _launcher_env(args(dist_on_itp=True)) == (1, 2, 1)
