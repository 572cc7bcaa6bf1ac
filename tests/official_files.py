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

import numpy as np
import torch

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
