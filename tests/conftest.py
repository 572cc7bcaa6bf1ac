"""Fixtures shared by several test modules."""
import gc
import shutil

import pytest
import torch
import torch.distributed as dist

from helpers import free_port


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on shared cores: one intra-op thread avoids oversubscribed (spinning) OpenMP threads.
    Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def module_tmp(request, tmp_path_factory):
    """A folder for the runs a module's tests share, removed when its tests are done: the R3D-18 and ViT
    checkpoints are hundreds of MB each, and pytest would otherwise keep every one until the session ends."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit('.', 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of this process alone: the code paths of a distributed run, in this process (so that
    coverage and monkeypatching see them)."""
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    dist.init_process_group('gloo', rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    # A group still referenced from a reference cycle would otherwise be freed by whichever process collects
    # first: in a later test's forked worker, its destructor waits forever for gloo threads the fork lacks.
    gc.collect()
