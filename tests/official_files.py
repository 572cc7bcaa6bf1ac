"""Checkpoint files as the official code writes them, for tests of what our scripts read.

Each writer reproduces what the official save code puts in the file, checked against the official repositories:
- LocalMIM / MAE pretraining (util/misc.py save_model): model, optimizer, epoch, scaler (the fp16 GradScaler of
  NativeScalerWithGradNormCount), args (an argparse Namespace); saved by torch 1.x, whose AdamW param groups
  hold only lr, betas, eps, weight_decay, amsgrad (no fused, foreach, capturable, differentiable, maximize) and
  whose Adam state counts `step` as a Python int.
- SLaK (ConvNeXt's utils.save_model, main.py): the same plus model_ema; its groups also carry `lr_scale`, and the
  training loop writes lr and weight_decay into them as numpy float64 (lr_schedule_values[it] * lr_scale). No masks:
  a sparse run's masks are its weights' zeros.
"""
import argparse
import collections
import copyreg
import pickle
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

from util.safe_load import Foreign, foreign_classes, safe_load

TORCH1_ADAMW_OPTIONS = ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad')  # torch 1.8-1.10 AdamW defaults
# what torch added to the group options since; a torch 1.x state has none of them
NEWER_TORCH_OPTIONS = ('foreach', 'maximize', 'capturable', 'differentiable', 'fused', 'decoupled_weight_decay')
# NativeScalerWithGradNormCount's state on a GPU run (torch.cuda.amp.GradScaler(), fp16), before any overflow
OFFICIAL_SCALER_STATE = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                         '_growth_tracker': 0}


def torch1_optimizer_state(state, numpy_floats=()):
    """An optimizer state_dict of today's torch as torch 1.x saved it: group options newer torch added removed,
    `step` a Python int; the group entries named in numpy_floats become numpy float64 (SLaK's schedules)."""
    groups = []
    for group in state['param_groups']:
        group = {k: v for k, v in group.items() if k not in NEWER_TORCH_OPTIONS}
        groups.append({k: (np.float64(v) if k in numpy_floats else v) for k, v in group.items()})
    per_param = {idx: {k: (int(v) if k == 'step' else v.clone()) for k, v in s.items()}
                 for idx, s in state['state'].items()}
    return {'state': per_param, 'param_groups': groups}


def stepped_adamw(model, groups, steps=1, seed=0, **options):
    """A torch AdamW over `groups` after `steps` steps on a random loss of `model`'s parameters."""
    optimizer = torch.optim.AdamW(groups, **options)
    generator = torch.Generator().manual_seed(seed)
    params = [p for g in optimizer.param_groups for p in g['params']]
    for _ in range(steps):
        loss = sum((p * torch.randn(p.shape, generator=generator)).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def localmim_pretrain_checkpoint(path, net, optimizer, epoch, **args):
    """The file LocalMIM's run_pretrain.py writes after `epoch` (util/misc.py save_model under torch 1.x)."""
    torch.save({'model': net.state_dict(), 'optimizer': torch1_optimizer_state(optimizer.state_dict()),
                'epoch': epoch, 'scaler': dict(OFFICIAL_SCALER_STATE), 'args': argparse.Namespace(**args)}, path)


def slak_checkpoint(path, model_state, optimizer_state, epoch, model_ema, **args):
    """The file SLaK's main.py writes after `epoch` (utils.save_model, run under torch 1.x with numpy schedules)."""
    torch.save({'model': model_state, 'epoch': epoch, 'scaler': dict(OFFICIAL_SCALER_STATE),
                'optimizer': torch1_optimizer_state(optimizer_state, numpy_floats=('lr', 'weight_decay')),
                'args': argparse.Namespace(**args), 'model_ema': model_ema}, path)


# eztorch (Lightning) checkpoints. tests/fixtures/lightning_sce_tiny.ckpt was written by Lightning and omegaconf
# themselves (tests/fixtures/lightning_sce_tiny_gen.py says how); its globals, as torch lists them:
LIGHTNING_SCE_GLOBALS = ['builtins.dict', 'builtins.int', 'builtins.list', 'collections.defaultdict',
                         'omegaconf.base.ContainerMetadata', 'omegaconf.base.Metadata',
                         'omegaconf.dictconfig.DictConfig', 'omegaconf.listconfig.ListConfig',
                         'omegaconf.nodes.AnyNode',
                         'typing.Any']
LIGHTNING_SCE_TINY = Path(__file__).parent / 'fixtures' / 'lightning_sce_tiny.ckpt'
STDLIB = {'builtins.dict': dict, 'builtins.int': int, 'builtins.list': list, 'typing.Any': typing.Any,
          'collections.defaultdict': collections.defaultdict}


def _revive_stdlib(obj, done):
    """The loaded fixture with its standard-library stand-ins turned back into the real objects (in place; `done`
    maps id -> result, the structure has cycles)."""
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, type) and issubclass(obj, Foreign) and obj.qualname in STDLIB:
        return STDLIB[obj.qualname]
    if isinstance(obj, Foreign) and obj.qualname == 'collections.defaultdict':
        done[id(obj)] = collections.defaultdict(*[_revive_stdlib(a, done) for a in obj.args])
        return done[id(obj)]
    done[id(obj)] = obj
    if isinstance(obj, Foreign):
        obj.args = tuple(_revive_stdlib(a, done) for a in obj.args)
        obj.state = _revive_stdlib(obj.state, done)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _revive_stdlib(v, done)
    elif isinstance(obj, list):
        obj[:] = [_revive_stdlib(v, done) for v in obj]
    elif isinstance(obj, tuple):
        done[id(obj)] = tuple(_revive_stdlib(v, done) for v in obj)
    return done[id(obj)]


class _StandInPickler(pickle.Pickler):
    """Pickles the loaded stand-ins back as their original classes did (NEWOBJ, then BUILD with their state)."""

    def reducer_override(self, obj):
        if isinstance(obj, Foreign):
            return copyreg.__newobj__, (type(obj), *obj.args), obj.state
        return NotImplemented


_STAND_IN_PICKLE = types.ModuleType('stand_in_pickle')
_STAND_IN_PICKLE.Pickler = _StandInPickler


def eztorch_checkpoint(path, state_dict):
    """An eztorch SCE pretraining checkpoint holding `state_dict`: the real Lightning fixture with its state_dict
    swapped, everything else (omegaconf hyper-parameters, callbacks, loops, LARS and scheduler states) as Lightning
    wrote it. The omegaconf classes are pickled under their own names without omegaconf being installed."""
    ckpt = _revive_stdlib(safe_load(str(LIGHTNING_SCE_TINY)), {})
    ckpt['state_dict'] = collections.OrderedDict(state_dict)
    classes = {cls.qualname: cls for cls in foreign_classes(ckpt)}
    saved = dict(sys.modules)
    try:
        for name, cls in classes.items():
            module, _, attr = name.rpartition('.')
            for depth in range(1, module.count('.') + 2):
                sys.modules.setdefault('.'.join(module.split('.')[:depth]), types.ModuleType(module))
            setattr(sys.modules[module], attr, cls)
        torch.save(ckpt, path, pickle_module=_STAND_IN_PICKLE)
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    return path

