"""Runs an entry script the way a launcher runs it, and makes every rank report on itself (for the launch tests).

    python -m torch.distributed.launch --nproc_per_node=2 tests/launch_dump.py main_spark.py --bs=64 ...

Each time the script writes a checkpoint, every rank also saves its own parameters and the
`find_unused_parameters` its DDP wrappers were built with to `$RANK_DUMP_DIR/rank<r>_epoch<e>.pt`, so a test can
check that the ranks hold identical weights (the checkpoint itself comes from rank 0 only). With
SIGNAL_AT_STEP=<rank>:<step>, that rank receives a SIGTERM after that optimizer step (a preemption).
"""
import os
import runpy
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import util.checkpoint  # noqa: E402  (after the path: the scripts import it from the repository)

ddp_find_unused = []
real_ddp_init = DistributedDataParallel.__init__


def recording_ddp_init(self, *args, **kwargs):
    ddp_find_unused.append(bool(kwargs.get('find_unused_parameters', False)))
    real_ddp_init(self, *args, **kwargs)


real_save = util.checkpoint.save_checkpoint


def save_and_dump(output_dir, epoch, step, args, model, *rest, **kwargs):
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = {name: p.detach().cpu().clone() for name, p in bare.named_parameters()}
    torch.save({'params': params, 'step': step, 'find_unused_parameters': list(ddp_find_unused)},
               os.path.join(os.environ['RANK_DUMP_DIR'], f'rank{rank}_epoch{epoch}.pt'))
    return real_save(output_dir, epoch, step, args, model, *rest, **kwargs)


DistributedDataParallel.__init__ = recording_ddp_init
util.checkpoint.save_checkpoint = save_and_dump

if os.environ.get('SIGNAL_AT_STEP'):  # 'rank:step': that rank sends itself SIGTERM after that optimizer step
    import signal

    import util.train_step
    signal_rank, signal_step = map(int, os.environ['SIGNAL_AT_STEP'].split(':'))
    real_step = util.train_step.TrainStep.step

    def step_then_signal(self, hooks=()):
        real_step(self, hooks)
        if self.num_updates == signal_step and int(os.environ.get('RANK', 0)) == signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)
    util.train_step.TrainStep.step = step_then_signal

if __name__ == '__main__':
    script_at = next(i for i, arg in enumerate(sys.argv) if arg.endswith('.py') and i > 0)
    script = os.path.join(REPO, sys.argv[script_at])
    sys.argv = [script] + sys.argv[1:script_at] + sys.argv[script_at + 1:]  # the launcher's --local-rank stays
    runpy.run_path(script, run_name='__main__')
