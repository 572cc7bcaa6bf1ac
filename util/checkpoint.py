"""One checkpoint format for every method, written atomically, loadable with weights_only=True.

A checkpoint holds: model, optimizer, epoch (last finished), step (optimizer steps so far), args (plain
dict), rng (per rank: python, numpy, torch CPU and CUDA states), `extra` (method state such as a freeze set
or sparse masks) and, only when an fp16 GradScaler is active, `scaler` (its state). The key is left out
otherwise (bf16, fp32): the official MAE-style resumes (`if 'scaler' in checkpoint:
loss_scaler.load_state_dict(...)`, with an fp16 GradScaler) then start a fresh scaler instead of failing.
`checkpoint-last.pth` is rewritten every epoch; `checkpoint-{epoch}.pth` is kept every --save_freq epochs
and at the end.
"""
import argparse
import glob
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from util.dist import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process

LAST = 'checkpoint-last.pth'


def rng_state():
    np_state = np.random.get_state()
    return {'python': random.getstate(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                      'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])}}


def set_rng_state(state):
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))


def plain_args(args):
    """argparse Namespace -> dict of plain values (weights_only-safe)."""
    ok = (str, int, float, bool, type(None))
    return {k: (v if isinstance(v, ok) or (isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v))
                else str(v)) for k, v in vars(args).items()}


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def all_rng_states():
    """Every rank's RNG state (a collective: call on all ranks)."""
    if not is_dist_avail_and_initialized():
        return [rng_state()]
    states = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(output_dir, epoch, step, args, model, optimizer, scaler=None, extra=None, keep=False, best=False,
                    name=LAST, top_level=None):
    """Writes `name` (checkpoint-last.pth), and checkpoint-{epoch}.pth when `keep`, checkpoint-best.pth when
    `best`. `top_level`: more entries next to ours (an official format's keys). Call on every rank."""
    rng = all_rng_states()
    if not is_main_process():
        return
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'epoch': epoch, 'step': step, 'args': plain_args(args), 'rng': rng, 'extra': extra or {}}
    scaler_state = scaler.state_dict() if scaler is not None else {}
    if scaler_state:  # a disabled GradScaler's state is {}, which an enabled one refuses to load
        state['scaler'] = scaler_state
    state.update(top_level or {})
    atomic_save(state, os.path.join(output_dir, name))
    if keep:
        atomic_save(state, os.path.join(output_dir, f'checkpoint-{epoch}.pth'))
    if best:
        atomic_save(state, os.path.join(output_dir, 'checkpoint-best.pth'))


def latest_checkpoint(output_dir):
    """The checkpoint of the highest finished epoch in output_dir, or None."""
    best, best_epoch = None, -1
    for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        match = re.search(r'checkpoint-(\d+)\.pth$', path)
        if match and int(match.group(1)) > best_epoch:
            best, best_epoch = path, int(match.group(1))
    last = os.path.join(output_dir, LAST)
    if os.path.exists(last):
        epoch = torch.load(last, map_location='cpu', weights_only=True, mmap=True)['epoch']
        if epoch >= best_epoch:
            best = last
    return best


def load_checkpoint(path, model, optimizer=None, scaler=None, strict=True, before_optimizer=None):
    """Restores model (+ optimizer, RNG, and the GradScaler when given and saved); returns the checkpoint dict.
    `before_optimizer(ckpt)` may reshape the optimizer (e.g. re-apply frozen units) to the saved layout."""
    if path.startswith('https://'):
        ckpt = torch.hub.load_state_dict_from_url(path, map_location='cpu', check_hash=True)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume {path}: no such checkpoint file')
        with torch.serialization.safe_globals([argparse.Namespace]):  # official checkpoints pickle their args
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    state = ckpt.get('model', ckpt)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise RuntimeError(f'checkpoint {path} does not fit this model ({first[:300]}); '
                           f'check --model and its flags (e.g. --hog_nbins, --hog_bias, --input_size)') from None
    if optimizer is not None and ckpt.get('optimizer') is not None:
        if before_optimizer is not None:
            before_optimizer(ckpt)
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and ckpt.get('scaler'):  # absent, None or {}: no fp16 run saved it; fresh scaler
            scaler.load_state_dict(ckpt['scaler'])
        rng = ckpt.get('rng') or []
        if len(rng) == get_world_size():
            set_rng_state(rng[get_rank()])
        else:
            print(f'checkpoint has RNG states of {len(rng)} processes, this run has {get_world_size()}: '
                  f'keeping fresh seeds (masks and augmentations will not replay exactly)')
    return ckpt
