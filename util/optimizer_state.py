"""Loading a saved optimizer state into this run's optimizer, whichever torch or code saved it.

torch's Optimizer.load_state_dict takes the saved param groups as they are. A state saved by an older torch (the
official LocalMIM and SLaK runs: torch 1.x) lacks the group options newer torch added (fused, foreach,
capturable, differentiable, decoupled_weight_decay, ...), so they end up None and the first fused step fails; and a
state saved for other parameters loads silently and fails at the first step, or trains wrong. Here the saved state
is checked first (one-line errors naming what differs), and every group option the file lacks, or holds as None,
is taken from this run's optimizer, as are the options that only choose an implementation.
"""
import inspect

import torch

IMPLEMENTATION_OPTIONS = ('fused', 'foreach', 'capturable', 'differentiable')


def _state_keys(optimizer):
    """The per-parameter state this optimizer keeps (e.g. {'step', 'exp_avg', 'exp_avg_sq'}), found by stepping a
    fresh one of its class on a 1-element parameter; None when it cannot be built that way."""
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.ones(1)
    accepted = inspect.signature(type(optimizer)).parameters
    options = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in IMPLEMENTATION_OPTIONS}
    try:
        probe = type(optimizer)([param], **options)
        probe.step()
    except Exception:  # noqa: BLE001 -- an optimizer with other constructor arguments: no kind check
        return None
    return set(probe.state[param])


def check_optimizer_state(saved, optimizer, path):
    """Raises a one-line ValueError unless `saved` (an optimizer state_dict) fits `optimizer`: the same number of
    param groups and of parameters per group, state tensors of each parameter's shape, and the state kind of this
    optimizer class (torch would load a misaligned state silently and fail, or train wrong, later)."""
    if not isinstance(saved, dict) or not isinstance(saved.get('param_groups'), list) or 'state' not in saved:
        raise ValueError(f'{path}: its optimizer entry holds no optimizer state_dict (param_groups, state)')
    groups = saved['param_groups']
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f'{path}: the optimizer state has {len(groups)} param groups, this run '
                         f'{len(optimizer.param_groups)}; was it saved for another --model, --opt or weight-decay '
                         f'grouping?')
    for g, (ours, theirs) in enumerate(zip(optimizer.param_groups, groups)):
        if len(ours['params']) != len(theirs['params']):
            raise ValueError(f'{path}: optimizer group {g} has {len(theirs["params"])} parameters, this run '
                             f'{len(ours["params"])}; was it saved for another --model?')
        for p, idx in zip(ours['params'], theirs['params']):
            for k, v in saved['state'].get(idx, {}).items():
                if torch.is_tensor(v) and v.ndim and v.shape != p.shape:
                    raise ValueError(f'{path}: optimizer state {k!r} of parameter {idx} has shape {list(v.shape)}, '
                                     f'the parameter {list(p.shape)}: the file orders its parameters differently')
    _check_kind(saved, optimizer, path)


def _check_kind(saved, optimizer, path):
    kept = next((set(s) for s in saved['state'].values() if s), None)
    needed = _state_keys(optimizer) if kept is not None else None
    if needed and needed - kept:
        raise ValueError(f'{path}: the optimizer state keeps {", ".join(sorted(kept))} per parameter, this run\'s '
                         f'{type(optimizer).__name__} needs {", ".join(sorted(needed))}; was it saved with another '
                         f'optimizer (--opt)?')


def with_this_runs_options(saved, optimizer):
    """`saved` with each group's options that are missing or None, and the implementation choices, taken from
    this run's optimizer (the saved lr, weight decay, betas, ... are kept)."""
    groups = []
    for theirs, ours in zip(saved['param_groups'], optimizer.param_groups):
        group = dict(theirs)
        for key, value in ours.items():
            if key != 'params' and (key in IMPLEMENTATION_OPTIONS or group.get(key) is None):
                group[key] = value
        groups.append(group)
    return {**saved, 'param_groups': groups}


def load_optimizer_state(optimizer, saved, path):
    """Checks `saved` against `optimizer` (one-line ValueError naming what differs) and loads it, group options
    the file lacks taken from this run."""
    check_optimizer_state(saved, optimizer, path)
    optimizer.load_state_dict(with_this_runs_options(saved, optimizer))
