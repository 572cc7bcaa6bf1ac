"""The R3D-18 trunk weights of any SCE checkpoint, in one layout, checked strictly.

Three kinds of file hold a trunk:
- ours (main_sce.py): `{'model': SCE state dict}`, the online trunk under `trunk.model.*`;
- eztorch's Lightning checkpoints: `{'state_dict': ...}` with the same `trunk.model.*` keys
  (https://github.com/juliendenize/eztorch, `run/*` loads them with the pattern `^trunk\\.model\\.`);
- trunk-only files: the keys already stripped (`blocks.0.conv.weight`, as the released trunks), or the
  state dict of a whole `models.r3d.r3d18_trunk()` (`model.blocks.*`).
The momentum trunk, projector, predictor, queue and online evaluator are dropped. The result has the keys of
`models.r3d.resnet3d_basic(18)` (= `r3d18_trunk().model`), i.e. the released trunk-only layout.
"""
import os

import torch

from models.r3d import resnet3d_basic
from util.checkpoint import read_checkpoint, report_ignored, what_model

TRUNK_PREFIX = 'trunk.model.'


def _template():
    """Key -> shape of the R3D-18 conv net, built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        net, _ = resnet3d_basic(18)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _state_of(checkpoint):
    for key in ('state_dict', 'model'):  # eztorch (Lightning), ours
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def r3d_trunk_state_dict(path_or_state):
    """The R3D-18 trunk weights (keys `blocks.*`) of a checkpoint file or an already loaded dict: ours, eztorch's
    or trunk-only. Raises one-line errors: FileNotFoundError, or ValueError when no trunk is found or its keys or
    shapes differ from R3D-18's."""
    name = str(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else 'the given state dict'
    if isinstance(path_or_state, (str, os.PathLike)):
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f'{name}: no such checkpoint file')
        path_or_state = read_checkpoint(path_or_state)
        report_ignored(name, path_or_state)
    if not isinstance(path_or_state, dict):
        raise ValueError(f'{name} holds a {type(path_or_state).__name__}, not a checkpoint dict')
    state = {k.removeprefix('module.'): v for k, v in _state_of(path_or_state).items() if torch.is_tensor(v)}
    for prefix in (TRUNK_PREFIX, 'model.', ''):  # SCE model (ours, eztorch), whole r3d18_trunk, stripped
        trunk = _strip(state, prefix)
        if any(k.startswith('blocks.') for k in trunk):
            break
    else:
        raise ValueError(f'{name} holds no R3D trunk: no trunk.model.*, model.blocks.* or blocks.* keys; it holds '
                         f'{what_model(state)}')
    expected = _template()
    missing = sorted(set(expected) - set(trunk))
    unexpected = sorted(set(trunk) - set(expected))
    wrong = [k for k in expected if k in trunk and tuple(trunk[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = (f'{len(missing)} missing (e.g. {missing[0]})' if missing else
                  f'{len(unexpected)} unexpected (e.g. {unexpected[0]})' if unexpected else
                  f'{wrong[0]} has shape {tuple(trunk[wrong[0]].shape)}, R3D-18 {expected[wrong[0]]}')
        raise ValueError(f'{name} is not an R3D-18 trunk: {detail}; expected a main_sce.py, eztorch or trunk-only '
                         f'R3D-18 checkpoint')
    return {k: trunk[k] for k in expected}


def load_r3d_trunk(trunk, path_or_state):
    """Loads the trunk weights of `path_or_state` (see `r3d_trunk_state_dict`) strictly into `trunk`, a
    `models.r3d.r3d18_trunk()`; returns it."""
    trunk.model.load_state_dict(r3d_trunk_state_dict(path_or_state), strict=True)
    return trunk
