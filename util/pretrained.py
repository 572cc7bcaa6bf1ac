"""Initialise a fine-tuning model from a pretraining checkpoint (`--finetune`), with a report.

The official loader (MAE / LocalMIM `main_finetune.py`) drops a differing head, resamples
`pos_embed`, loads with strict=False and asserts that exactly the head and `fc_norm` are missing. That
assertion fails for LocalMIM checkpoints in cls-token mode (they have tap norms `norm.0..3`, no final
`norm`). Here every checkpoint key is either loaded or dropped for a stated reason, the only keys a
model may lack are its classifier and its final norm (both initialised, and said so), and anything
else -- a missing encoder tensor, a shape that differs, a key nobody expects -- is one clear error.

Works for the ViTs of `models/vit.py` (LocalMIM and MAE checkpoints) and for timm CNNs fed a SparK
encoder checkpoint (ours in timm key layout, or an official one: ConvNeXt keys are renamed to timm's).
"""
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from models.convnext_keys import convnext_official_to_timm, is_official_convnext
from util.checkpoint import read_checkpoint, report_ignored, what_model

# Keys that only the pretraining model has: MAE's decoder (`decoder_embed`, `decoder_blocks`, ...,
# `mask_token`), LocalMIM's per-tap decoders and HOG layers and its tap norms `norm.0` .. `norm.3`.
PRETRAIN_ONLY = re.compile(r'^(decoder[._]|hog_enc\.|mask_token$|norm\.\d+\.)')
# Final norms a model may have that a checkpoint lacks (LocalMIM has no `norm`, nobody pretrains
# `fc_norm`, a SparK ConvNeXt encoder has no `head.norm`); a checkpoint's copy the model does not
# use (MAE's `norm` under global pooling) is dropped.
FINAL_NORMS = ('fc_norm.', 'norm.', 'head.norm.')
CLASSIFIERS = ('head.fc.', 'fc.', 'head.')  # fallbacks when a model has no get_classifier()
HEAD_STD = 2e-5  # MAE: trunc_normal_(model.head.weight, std=2e-5)
SPARK_ENCODER = 'sparse_encoder.sp_cnn.'  # the CNN's keys inside a SparK checkpoint (models/spark.py)


def read_state_dict(path):
    """The model state dict of a checkpoint file (read without running code from it): `ckpt['model']`,
    `['state_dict']`, `['module']` or the raw dict; tensors only, a DDP `module.` prefix stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--finetune {path}: no such checkpoint file')
    ckpt = read_checkpoint(path)
    report_ignored(path, ckpt)
    state = ckpt
    for key in ('model', 'state_dict', 'module'):
        if isinstance(ckpt.get(key), dict):
            state = ckpt[key]
            break
    state = {(k[len('module.'):] if k.startswith('module.') else k): v
             for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f'checkpoint {path} holds no tensors under model/state_dict/module or at the top level '
                         f'(top-level keys: {", ".join(map(str, list(ckpt)[:10]))})')
    if any(k.startswith(SPARK_ENCODER) for k in state):  # a whole SparK model: its encoder is the CNN
        state = {k[len(SPARK_ENCODER):]: v for k, v in state.items() if k.startswith(SPARK_ENCODER)}
    if is_official_convnext(state):  # official SparK ConvNeXt encoders: FB ConvNeXt names -> timm's
        state = convnext_official_to_timm(state)
    return state


def _classifier_prefixes(model, model_keys):
    """Prefixes of the model's classifier keys ('head.' for a ViT, 'fc.' for a ResNet, 'head.fc.' for a
    timm ConvNeXt), found through timm's get_classifier()."""
    if hasattr(model, 'get_classifier'):
        clf = model.get_classifier()
        names = [name for name, mod in model.named_modules() if mod is clf and name]
        if names:
            return tuple(n + '.' for n in names)
    for prefix in CLASSIFIERS:
        if any(k.startswith(prefix) for k in model_keys):
            return (prefix,)
    return ()


def _describe(model):
    name = type(model).__name__
    if isinstance(model, VisionTransformer):
        pool = 'global pool' if model.global_pool == 'avg' else f'{model.global_pool} pool'
        name += f'(embed_dim {model.embed_dim}, depth {len(model.blocks)}, {pool})'
    return name


def _resample_pos_embed(posemb, model):
    """Checkpoint pos_embed -> the model's patch grid (bicubic, prefix rows unchanged), as MAE's
    interpolate_pos_embed; returns (tensor, 'AxB -> CxD') or (posemb, None) when nothing to do."""
    target = model.pos_embed
    if posemb.shape == target.shape or posemb.ndim != 3 or posemb.shape[-1] != target.shape[-1]:
        return posemb, None  # equal, or a width mismatch that the shape check reports
    new_size = list(model.patch_embed.grid_size)
    num_prefix = target.shape[1] - new_size[0] * new_size[1]
    old = posemb.shape[1] - num_prefix
    side = int(round(old ** 0.5))
    if old <= 0 or side * side != old:
        return posemb, None
    # antialias/align_corners off: F.interpolate's defaults, which MAE's interpolate_pos_embed uses
    resampled = resample_abs_pos_embed(posemb, new_size, old_size=[side, side], num_prefix_tokens=num_prefix,
                                       interpolation='bicubic', antialias=False, align_corners=False)
    return resampled, f'{side}x{side} -> {new_size[0]}x{new_size[1]}'


def _group(key):
    """A short prefix for the printed report: 'decoder.*', 'norm.<tap>.*', 'decoder_embed.*'."""
    first = key.split('.')[0]
    if PRETRAIN_ONLY.match(key) and first == 'norm':
        return 'norm.<tap>.*'
    return first + ('.*' if '.' in key else '')


def _is_final_norm(key):
    return key.startswith(FINAL_NORMS) and not PRETRAIN_ONLY.match(key)


def _classifier_test(model, model_state):
    """A predicate: is this key one of the model's classifier keys?"""
    prefixes = _classifier_prefixes(model, model_state)
    return lambda key: bool(prefixes) and key.startswith(prefixes)


def _filter_checkpoint(state, model_state, is_clf):
    """(kept, dropped, reasons): the checkpoint tensors to load, the keys dropped and a count per reason."""
    kept, dropped, reasons = {}, [], Counter()
    for k, v in state.items():
        if PRETRAIN_ONLY.match(k):
            reason = _group(k)
        elif is_clf(k) and (k not in model_state or v.shape != model_state[k].shape):
            reason = f'{_group(k)} (classifier, shape {list(v.shape)})'  # a pretraining head, or other classes
        elif _is_final_norm(k) and k not in model_state:
            reason = f'{k.rsplit(".", 1)[0]}.* (not used by this model)'  # e.g. MAE's norm under global pooling
        else:
            kept[k] = v
            continue
        dropped.append(k)
        reasons[reason] += 1
    return kept, dropped, reasons


def _resample_kept_pos_embed(kept, model_state, model):
    """Resamples kept['pos_embed'] in place to the model's patch grid; returns 'AxB -> CxD' or None."""
    if 'pos_embed' not in kept or 'pos_embed' not in model_state or not hasattr(model, 'patch_embed'):
        return None
    kept['pos_embed'], how = _resample_pos_embed(kept['pos_embed'], model)
    return how


def _check_fit(kept, model_state, is_clf, model, path, state):
    """One ValueError naming missing encoder keys, unexpected keys and shape mismatches, if any."""
    missing = [k for k in model_state if k not in kept and not is_clf(k) and not _is_final_norm(k)]
    unexpected = [k for k in kept if k not in model_state]
    mismatched = [f'{k} {list(v.shape)} vs {list(model_state[k].shape)}'
                  for k, v in kept.items() if k in model_state and v.shape != model_state[k].shape]
    parts = []
    for what, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            more = ', ...' if len(keys) > 3 else ''
            parts.append(f'{what} {", ".join(keys[:3])}{more} ({len(keys)} keys)')
    if parts:
        raise ValueError(f'checkpoint {path} does not fit model {_describe(model)}: it holds {what_model(state)}; '
                         f'{"; ".join(parts)}')


@torch.no_grad()
def _initialise(model, initialised, is_clf):
    """Initialises the classifier and final-norm keys the checkpoint lacked; returns a note per group."""
    notes = []
    head = [k for k in initialised if is_clf(k)]
    if head:
        if isinstance(model, VisionTransformer) and isinstance(model.head, nn.Linear):
            trunc_normal_(model.head.weight, std=HEAD_STD)
            nn.init.zeros_(model.head.bias)
            notes.append(f'{", ".join(head)}: trunc_normal std {HEAD_STD:g}, bias 0 (as MAE)')
        else:
            notes.append(f'{", ".join(head)}: the model\'s own init')
    params = dict(model.named_parameters())
    norms = [k for k in initialised if _is_final_norm(k)]
    for k in norms:
        if k.endswith('.weight'):
            params[k].fill_(1.0)
        elif k.endswith('.bias'):
            params[k].zero_()
    if norms:
        why = ' (a LocalMIM checkpoint has no final norm)' if any(k.startswith('norm.') for k in norms) else ''
        notes.append(f'{", ".join(norms)}: weight 1, bias 0{why}')
    return notes


def _print_report(path, model, report, reasons, notes):
    groups = ', '.join(f'{g} {n}' for g, n in reasons.most_common(6))
    print(f'load_pretrained {path} -> {_describe(model)}: loaded {len(report["loaded"])} tensors, '
          f'dropped {len(report["dropped"])}{f" ({groups})" if groups else ""}, '
          f'initialised {len(report["initialised"])}, resampled {len(report["resampled"])}')
    for note in notes:
        print(f'  {note}')


def load_pretrained(model, path, verbose=True):
    """Loads the encoder of checkpoint `path` into `model` (strict about everything but the classifier
    and the final norm). Returns {'loaded', 'dropped', 'initialised', 'resampled'}: lists of keys."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    model_state = model.state_dict()
    is_clf = _classifier_test(model, model_state)
    state = read_state_dict(path)
    kept, dropped, reasons = _filter_checkpoint(state, model_state, is_clf)
    how = _resample_kept_pos_embed(kept, model_state, model)
    notes = [f'pos_embed {how}'] if how else []
    _check_fit(kept, model_state, is_clf, model, path, state)
    result = model.load_state_dict(kept, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
    initialised = list(result.missing_keys)
    notes += _initialise(model, initialised, is_clf)
    report = {'loaded': list(kept), 'dropped': dropped, 'initialised': initialised,
              'resampled': ['pos_embed'] if how else []}
    if verbose:
        _print_report(path, model, report, reasons, notes)
    return report
