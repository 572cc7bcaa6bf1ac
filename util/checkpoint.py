"""One checkpoint format for every method, written atomically, loadable with weights_only=True.

A checkpoint holds: model, optimizer, epoch (last finished), step (optimizer steps so far), args (plain
dict), rng (per rank: python, numpy, torch CPU and CUDA states), `extra` (method state such as a freeze set
or sparse masks) and, only when an fp16 GradScaler is active, `scaler` (its state). The key is left out
otherwise (bf16, fp32): the official MAE-style resumes (`if 'scaler' in checkpoint:
loss_scaler.load_state_dict(...)`, with an fp16 GradScaler) then start a fresh scaler instead of failing.
`checkpoint-last.pth` is rewritten every epoch; `checkpoint-{epoch}.pth` is kept every --save_freq epochs
and at the end.

Nothing bad replaces a good file: a model holding NaN or inf is not saved, a failed write (a full disk) leaves
the previous file as it was, and auto-resume skips a file it cannot read (a write killed midway) for the next
newest. Each of these ends in, or is reported as, one line.
"""
import contextlib
import glob
import itertools
import os
import pickle
import random
import re
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist

from util.dist import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from util.optimizer_state import load_optimizer_state
from util.safe_load import UnsafeCheckpointError, describe, foreign_names, safe_load
from util.train_step import NonFiniteLossError

LAST = 'checkpoint-last.pth'


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or written; the message is one line (run_cli prints it)."""


class NonFiniteStateError(NonFiniteLossError):
    """The model holds NaN or inf, so it is not saved."""


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


def _resume_hint(last_good):
    if last_good and os.path.isfile(last_good):
        return f'the last good checkpoint is {last_good}, unchanged'
    return 'no checkpoint was saved before'


def write_file(obj, path, last_good=None):
    """atomic_save; a failed write (full disk, quota, I/O error) becomes a one-line CheckpointError naming the file
    and the checkpoint `last_good` to resume from."""
    try:
        atomic_save(obj, path)
    except (OSError, RuntimeError) as error:
        cause = error  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        message = f'could not write {path}: {cause.strerror or cause}; {_resume_hint(last_good)}'
        raise CheckpointError(message) from error


def on_main_process(write, model):
    """Calls write() on the main process only; call on every rank. A CheckpointError there is raised on every rank
    (the others would otherwise wait for the main process in their next collective)."""
    error = None
    if is_main_process():
        try:
            write()
        except CheckpointError as e:
            error = e
    written = error is None
    if is_dist_avail_and_initialized():
        written = bool(_min_over_ranks(torch.tensor(int(written), device=next(model.parameters()).device)))
    if not written:
        raise error or CheckpointError('the main process could not write the checkpoint (its error says why)')


def _min_over_ranks(value):
    """The smallest of every rank's 0-d integer tensor `value`, as an int (one host sync)."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value)


def first_nonfinite(model):
    """The name of the model's first floating parameter or buffer holding a NaN or inf on any rank, or None. The
    tensors are checked on their device with one host sync (and one all-reduce, so that every rank agrees)."""
    named = [(name, t.detach()) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
             if t.is_floating_point()]
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    first = _min_over_ranks(torch.arange(len(named), device=device).masked_fill(finite, len(named)).min())
    return named[first][0] if first < len(named) else None


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
    `best`. `top_level`: more entries next to ours (an official format's keys). Call on every rank.
    A model holding NaN or inf is not saved (NonFiniteStateError) and a failed write raises a CheckpointError, on
    every rank; either way the previous checkpoint stays as it was."""
    last_good = os.path.join(output_dir, LAST if os.path.isfile(os.path.join(output_dir, LAST)) else name)
    bad = first_nonfinite(model)
    if bad is not None:
        raise NonFiniteStateError(f'{bad} holds NaN or inf at optimizer step {step}: not saved '
                                  f'({_resume_hint(last_good)}); lower the learning rate or clip gradients')
    rng = all_rng_states()

    def write():
        state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'epoch': epoch, 'step': step, 'args': plain_args(args), 'rng': rng, 'extra': extra or {}}
        scaler_state = scaler.state_dict() if scaler is not None else {}
        if scaler_state:  # a disabled GradScaler's state is {}, which an enabled one refuses to load
            state['scaler'] = scaler_state
        state.update(top_level or {})
        for file in [name] + ([f'checkpoint-{epoch}.pth'] if keep else []) + (['checkpoint-best.pth'] if best else []):
            write_file(state, os.path.join(output_dir, file), last_good)
    on_main_process(write, model)


def read_checkpoint(path, mmap=False):
    """The dict a checkpoint file holds, on the CPU, read without running code from it (util/safe_load.py): ours,
    and what the official code writes (argparse Namespaces, numpy floats, Lightning's omegaconf entries). One-line
    CheckpointError for a file that is damaged (empty, truncated, not a zip archive or pickle), that would run code
    when loaded, or that holds something other than a dict (it names what). `mmap`: tensors stay on disk until
    used, a cheap check that a file reads."""
    try:
        ckpt = safe_load(path, mmap=mmap)
    except UnsafeCheckpointError as error:
        raise CheckpointError(str(error)) from None
    except (MemoryError, PermissionError):
        raise
    except Exception as error:  # damage shows as RuntimeError, EOFError, UnpicklingError, KeyError, OSError, ...
        raise CheckpointError(f'{path} cannot be read: {_why_unreadable(path, error)[:200]}') from None
    if not isinstance(ckpt, dict):
        whole_model = ' (a whole model saved with torch.save(model)? save its state_dict())' \
            if foreign_names(ckpt) and not isinstance(ckpt, (list, tuple)) else ''
        raise CheckpointError(f'{path} holds {describe(ckpt)}, not a checkpoint dict{whole_model}')
    return ckpt


def report_ignored(path, ckpt):
    """One line naming the entries of a checkpoint that hold classes read as inert data (Lightning's omegaconf
    hyper-parameters, say): nothing of them is used."""
    entries = {k: v for k, v in ckpt.items() if foreign_names(v)}
    if entries:
        names = [name.rsplit('.', 1)[-1] for name in foreign_names(entries)]
        print(f'{path}: ignored {", ".join(map(str, entries))} (pickled {", ".join(names[:5])}'
              f'{", ..." if len(names) > 5 else ""}: read as inert data, not imported)')


def _why_unreadable(path, error):
    """Why torch could not read the file: damage (said so), or what it holds that a safe reader cannot rebuild."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        start = f.read(4)
    if size == 0:
        return 'empty file: damaged'
    if start == b'PK\x03\x04' and not zipfile.is_zipfile(path):
        return f'truncated at {size} bytes, the end of its zip archive is missing: damaged'
    if not zipfile.is_zipfile(path) and not start.startswith(b'\x80'):
        return f'neither a zip archive nor a pickle, it starts with {start!r}: damaged, or not a checkpoint'
    text = str(error).strip()
    if 'WeightsUnpickler error: ' in text:  # torch's long weights_only message: the line that says why
        text = text.split('WeightsUnpickler error: ', 1)[1].strip()
    text = (text.splitlines() or [''])[0].split('. ')[0]
    if 'Invalid magic number' in text:
        return 'a pickle not written by torch.save (e.g. a detectron2 .pkl): not a checkpoint'
    if isinstance(error, pickle.UnpicklingError) and not text.startswith(('Unsupported operand', 'unpickling stack')):
        return f'it holds Python objects that cannot be rebuilt without running their code: {text}'
    return f'{type(error).__name__}: {text}: damaged'


def readable_checkpoint(path):
    """The checkpoint at path (tensors memory-mapped), or None after one line saying why it cannot be read."""
    try:
        return read_checkpoint(path, mmap=True)
    except CheckpointError as error:
        print(f'{error}; skipped')
        return None


def no_readable_checkpoint(folder, damaged, resume_flag='--resume'):
    """The one-line error of a folder whose checkpoints are all unreadable: a run never starts over there by
    itself, since that would overwrite the files."""
    return CheckpointError(f'no checkpoint in {folder} can be resumed ({", ".join(map(os.path.basename, damaged))}: '
                           f'see above); resume another file with {resume_flag} FILE, or start over on purpose with '
                           f'--auto_resume false (the files there will be overwritten)')


def latest_checkpoint(output_dir):
    """The readable checkpoint of the highest finished epoch in output_dir (checkpoint-last.pth on a tie), or None
    when it holds none. A file that cannot be read is reported in one line and the next newest one is tried; when
    none is left, a one-line CheckpointError."""
    numbered = sorted(((int(m.group(1)), path) for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth'))
                       if (m := re.search(r'checkpoint-(\d+)\.pth$', path))), reverse=True)
    last, last_epoch = os.path.join(output_dir, LAST), None
    if os.path.exists(last):
        ckpt = readable_checkpoint(last)
        last_epoch = ckpt.get('epoch') if isinstance(ckpt, dict) else None
        if ckpt is not None and not isinstance(last_epoch, int):
            print(f'{last} has no epoch number; skipped')
            last_epoch = None
    for epoch, path in numbered:
        if last_epoch is not None and epoch <= last_epoch:
            break
        if readable_checkpoint(path) is not None:
            return path
    if last_epoch is not None:
        return last
    if numbered or os.path.exists(last):
        raise no_readable_checkpoint(output_dir, [path for _, path in numbered] + [last] * os.path.exists(last))
    return None


def _process_alive(pid):
    if os.name != 'posix':  # os.kill(pid, 0) would end the process on Windows: keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale_temp_files(folder):
    """Deletes the `*.tmp.<pid>` files (up to a whole checkpoint each) that writes killed midway left in folder,
    when process <pid> is gone. Main process only."""
    if not folder or not is_main_process():
        return
    for path in glob.glob(os.path.join(glob.escape(folder), '*.tmp.*')):
        match = re.search(r'\.tmp\.(\d+)$', path)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                print(f'removed {path}, left by a checkpoint write that was killed')


# (a key only that kind of model has, what it is), the most specific first
MODEL_SIGNS = (('hog_enc.', 'a LocalMIM pretraining ViT'), ('decoder_embed.', 'an MAE pretraining ViT'),
               ('sparse_encoder.', 'a SparK pretraining model'), ('trunk.model.', 'an SCE video model (R3D-18)'),
               ('.large_kernel.', 'a SLaK ConvNet'), ('downsample_layers.', 'a ConvNeXt (official layout)'),
               ('patch_embed.', 'a ViT'), ('layer1.0.', 'a ResNet'), ('stages.', 'a ConvNeXt (timm layout)'),
               ('blocks.0.', 'an R3D-18 trunk'))


def what_model(state):
    """What a model state dict holds, in words ('a SLaK ConvNet (62 tensors)'), for errors."""
    if not isinstance(state, dict):
        return describe(state)
    keys = [k.removeprefix('module.') for k in state if isinstance(k, str)]
    what = next((name for sign, name in MODEL_SIGNS if any(sign in k if sign[0] == '.' else k.startswith(sign)
                                                            for k in keys)), 'an unknown model')
    return f'{what} ({len(keys)} tensors, first {", ".join(keys[:2])})'


def load_checkpoint(path, model, optimizer=None, scaler=None, strict=True, before_optimizer=None):
    """Restores model (+ optimizer, RNG, and the GradScaler when given and saved); returns the checkpoint dict.
    `before_optimizer(ckpt)` may reshape the optimizer (e.g. re-apply frozen units) to the saved layout."""
    if path.startswith('https://'):  # the official scripts' released-weights URLs: downloaded once, read safely
        url, path = path, os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urlparse(path).path))
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume {path}: no such checkpoint file')
    ckpt = read_checkpoint(path)
    report_ignored(path, ckpt)
    state = ckpt.get('model', ckpt)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f'checkpoint {path} does not fit this model: it holds {what_model(state)}, this run builds '
                         f'a {type(model).__name__} ({first[:300]}); check --model and its flags (e.g. --hog_nbins, '
                         f'--input_size, --kernel_size)') from None
    if optimizer is not None and ckpt.get('optimizer') is not None:
        if before_optimizer is not None:
            before_optimizer(ckpt)
        load_optimizer_state(optimizer, ckpt['optimizer'], path)
        if scaler is not None and ckpt.get('scaler'):  # absent, None or {}: no fp16 run saved it; fresh scaler
            scaler.load_state_dict(ckpt['scaler'])
        rng = ckpt.get('rng') or []
        if len(rng) == get_world_size():
            set_rng_state(rng[get_rank()])
        else:
            print(f'checkpoint has RNG states of {len(rng)} processes, this run has {get_world_size()}: '
                  f'keeping fresh seeds (masks and augmentations will not replay exactly)')
    return ckpt
