"""Process-group setup for every launcher: `python`, `torchrun`, `python -m torch.distributed.launch`
(which also passes --local-rank/--local_rank), SLURM `srun`, and OpenMPI (`--dist_on_itp`).

NCCL on GPU, gloo on CPU. Non-master ranks print only with `print(..., force=True)`.
"""
import builtins
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

_groups_created_here = []  # the group init_distributed_mode made (tests may bring their own, which they close)
_builtin_print = builtins.print  # kept so repeated setup (e.g. several runs in one test process) never nests

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks; prefix a timestamp; `force=True` prints anyway."""
    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            now = datetime.datetime.now().time()
            _builtin_print(f'[{now:%H:%M:%S}]', *args, **kwargs)

    builtins.print = print


def _slurm_master_addr():
    nodes = os.environ.get('SLURM_JOB_NODELIST') or os.environ.get('SLURM_NODELIST')
    if nodes:
        try:
            out = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True, check=True)
            return out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    return os.environ.get('SLURM_LAUNCH_NODE_IPADDR', '127.0.0.1')


def _launcher_env(args):
    """(rank, world_size, local_rank) from the launcher's environment, or None when not launched."""
    env = os.environ
    if getattr(args, 'dist_on_itp', False):
        rank, world, local = (int(env[f'OMPI_COMM_WORLD_{k}']) for k in ('RANK', 'SIZE', 'LOCAL_RANK'))
    elif 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun, torch.distributed.launch
        rank, world = int(env['RANK']), int(env['WORLD_SIZE'])
        local = int(env.get('LOCAL_RANK', max(getattr(args, 'local_rank', -1), 0)))
    elif int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in env:  # srun
        rank, world = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        local = int(env.get('SLURM_LOCALID', 0))
        env.setdefault('MASTER_ADDR', _slurm_master_addr())
        env.setdefault('MASTER_PORT', '29500')
    else:
        return None
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def init_distributed_mode(args):
    """Sets args.{distributed, rank, world_size, gpu, device} and joins the process group if launched."""
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print(f'--device {args.device} requested but CUDA is not available: running on CPU')
        args.device = 'cpu'
    launched = _launcher_env(args)
    if launched is None or launched[1] == 1:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        setup_for_distributed(True)
        return
    args.rank, args.world_size, args.gpu = launched
    args.distributed = True
    on_gpu = args.device.startswith('cuda')
    if on_gpu:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = 'nccl' if on_gpu else 'gloo'
    print(f'| distributed init (rank {args.rank}/{args.world_size}, {backend}): {args.dist_url}', flush=True)
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, device_id=torch.device(args.device) if on_gpu else None)
    dist.barrier()
    _groups_created_here.append(dist.group.WORLD)
    setup_for_distributed(args.rank == 0)


def finish_distributed():
    """After a run that ended normally on every rank: wait for the peers, then tear down the group this module
    created. A process that exits with gloo's group still alive can abort in its destructor ('terminate called
    without an active exception'), and one that leaves first can cut a peer's last collective."""
    if _groups_created_here and is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _groups_created_here.clear()


def all_reduce_sum(tensor):
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor
