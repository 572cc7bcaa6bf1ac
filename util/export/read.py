"""The backbone of any checkpoint this repository writes (or an official release it reads), in timm's key layout.

`read_backbone(path)` finds what a checkpoint holds -- a ViT (LocalMIM / FreezeOut / MAE pretraining, fine-tuned
or linear-probed), a ResNet or ConvNeXt (SparK, fine-tuned), a SLaK, or SCE's R3D-18 trunk -- keeps the encoder
(and a trained classifier) and drops the rest: decoders, HOG layers, tap norms, mask tokens, SparK's densify layers,
SCE's momentum branch, projector, predictor and queue. It names the timm model whose state dict has exactly these
keys and shapes (checked on the meta device). util/export/formats.py writes the result for each tool.
"""
import argparse
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import timm
import torch

import models  # noqa: F401  (registers SLaK_*)
from models.slak import rename_old_keys
from util.checkpoint import read_checkpoint
from util.pretrained import PRETRAIN_ONLY, SPARK_ENCODER, read_state_dict
from util.video.checkpoint import r3d_trunk_state_dict

VIT_NAMES = {(192, 12, 16): 'vit_tiny_patch16_224', (384, 12, 16): 'vit_small_patch16_224',
             (768, 12, 16): 'vit_base_patch16_224', (1024, 24, 16): 'vit_large_patch16_224',
             (1280, 32, 14): 'vit_huge_patch14_224'}  # (width, depth, patch) -> timm name
RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200')
CONVNEXTS = ('convnext_atto', 'convnext_femto', 'convnext_pico', 'convnext_nano', 'convnext_tiny', 'convnext_small',
             'convnext_base', 'convnext_large', 'convnext_xlarge')
SLAKS = {'SLaK_tiny': (9, 96), 'SLaK_small': (27, 96), 'SLaK_base': (27, 128), 'SLaK_large': (27, 192)}  # (blocks
# in stage 3, stem width at --width_factor 1): the width factor is tried as the stem ratio, then 1.3 and 1 (official)
SLAK_WIDTHS = (1.3, 1.0)
# 'custom': a model registered in models/spark_custom_cnn.py that the checkpoint names, its classifier `fc` as in the
# template
CLASSIFIER = {'vit': 'head.', 'resnet': 'fc.', 'convnext': 'head.fc.', 'slak': 'head.', 'custom': 'fc.'}
LINPROBE_EPS = 1e-6  # run_finetune.py --linprobe: BatchNorm1d(affine=False, eps=1e-6) in front of the classifier


@dataclass
class Backbone:
    what: str                   # what the checkpoint holds, in words
    family: str                 # 'vit', 'resnet', 'convnext', 'slak', 'r3d' or 'custom'
    state: dict                 # timm layout (R3D-18: the models/r3d.py trunk layout)
    timm_name: str = None
    timm_kwargs: dict = field(default_factory=dict)  # create_model arguments besides num_classes
    num_classes: int = 0        # rows of the kept classifier; 0: none kept
    img_size: int = None        # ViTs: the size pos_embed was trained at
    dropped: Counter = field(default_factory=Counter)  # 'decoder.*' -> number of tensors
    notes: list = field(default_factory=list)

    def summary(self):
        """Lines saying what was found, kept and dropped."""
        lines = [f'found: {self.what}', f'kept: {len(self.state)} tensors'
                 + (f' as timm {self.timm_name!r}' if self.timm_name else '')
                 + (f' with a {self.num_classes}-class classifier' if self.num_classes else ', no classifier')]
        if self.dropped:
            lines.append('dropped: ' + ', '.join(f'{group} ({n})' for group, n in self.dropped.most_common()))
        return lines + self.notes


def _group(key):
    first = key.split('.')[0]
    return 'norm.<tap>.*' if re.match(r'norm\.\d+\.', key) else first + ('.*' if '.' in key else '')


def _load(path):
    """(whole checkpoint dict, model state dict), read without running code from the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such checkpoint file')
    return read_checkpoint(path, mmap=True), read_state_dict(path)


def _ema_state(ckpt, path):
    """The EMA weights of a main_slak.py (`model_ema`) or run_finetune.py --model_ema (`extra.ema`) checkpoint."""
    ema = ckpt.get('model_ema') or (ckpt.get('extra') or {}).get('ema')
    if not isinstance(ema, dict):
        raise ValueError(f'{path} holds no EMA weights (model_ema or extra.ema); export without --ema')
    return {k.removeprefix('module.'): v for k, v in ema.items() if torch.is_tensor(v)}


def _family(state):
    if any(v.ndim == 5 for v in state.values()):
        return 'r3d'
    if 'patch_embed.proj.weight' in state and 'blocks.0.attn.qkv.weight' in state:
        return 'vit'
    if 'conv1.weight' in state and 'layer1.0.conv1.weight' in state:
        return 'resnet'
    if 'stem.0.weight' in state and any('.conv_dw.' in k for k in state):
        return 'convnext'
    if 'downsample_layers.0.0.weight' in state and any('.large_kernel.' in k for k in state):
        return 'slak'
    return None


def _fold_linprobe(state, prefix, notes):
    """MAE's linear probe (BatchNorm1d without affine, then Linear) folded into one Linear: the same logits in
    eval mode, under the classifier's usual keys."""
    bn, fc = prefix + '0.', prefix + '1.'
    if bn + 'running_var' not in state or fc + 'weight' not in state:
        return state
    scale = (state[bn + 'running_var'].double() + LINPROBE_EPS).rsqrt()
    weight = state[fc + 'weight'].double() * scale
    bias = state[fc + 'bias'].double() - weight @ state[bn + 'running_mean'].double()
    state = {k: v for k, v in state.items() if not k.startswith((bn, fc))}
    state[prefix + 'weight'], state[prefix + 'bias'] = weight.float(), bias.float()
    notes.append(f'linear probe: {bn}* (BatchNorm1d) folded into {prefix}weight/bias')
    return state


def _vit(state, dropped, notes):
    """Encoder + final norm (+ head) of a ViT; LocalMIM's tap norm after the last block becomes `norm`."""
    taps = sorted(int(m.group(1)) for k in state if (m := re.match(r'norm\.(\d+)\.weight$', k)))
    if taps:
        last = f'norm.{taps[-1]}.'
        state = {('norm.' + k[len(last):] if k.startswith(last) else k): v for k, v in state.items()}
        notes.append(f'{last}* (LocalMIM\'s norm after the last block, what its last decoder reads) -> norm.*')
    kept = {}
    for k, v in state.items():
        if PRETRAIN_ONLY.match(k):
            dropped[_group(k)] += 1
        else:
            kept[k] = v
    return kept


def _add_head_norm(state, notes):
    """A SparK ConvNeXt encoder has no head norm (SparK never runs it); timm's ConvNeXt has one before its
    classifier, initialised here to weight 1, bias 0 as timm does."""
    last = max(int(k.split('.')[1]) for k in state if k.startswith('stages.'))
    width = state[f'stages.{last}.blocks.0.conv_dw.weight'].shape[0]
    notes.append('head.norm.* (SparK trains no head norm): weight 1, bias 0')
    return {**state, 'head.norm.weight': torch.ones(width), 'head.norm.bias': torch.zeros(width)}


def _slak_kwargs(state, args):
    """create_model arguments of a SLaK state dict: Decom, bn and kernel_size from the kernel shapes."""
    if any('.lkb_reparam.' in k for k in state):
        raise ValueError('a reparameterized SLaK (lkb_reparam) has no training-time layout: export the checkpoint '
                         'written by main_slak.py')
    decom = any('.large_kernel.LoRA1.' in k for k in state)
    branch = 'LoRA1' if decom else 'lkb_origin'
    kernels = [state[f'stages.{i}.0.large_kernel.{branch}.conv.weight'].shape[-2:] for i in range(4)]
    smalls = [v.shape[-1] for k, v in state.items() if k.endswith('small_conv.conv.weight')]
    small = kernels[0][1] if decom else smalls[0] if smalls else max(k[0] for k in kernels)
    kwargs = dict(kernel_size=[int(k[0]) for k in kernels] + [int(small)], Decom=decom,
                  bn=any(re.search(r'\.large_kernel\.\w+\.bn\.', k) for k in state))
    if args.get('kernel_size') and list(args['kernel_size']) != kwargs['kernel_size']:
        kwargs['kernel_size'] = list(args['kernel_size'])  # the run's value; the shapes cannot tell small >= large
    return kwargs


def _slak_candidates(state, args, num_classes):
    """(name, create_model kwargs) that may fit a SLaK state dict, the likeliest first (each costs a model build)."""
    kwargs = dict(_slak_kwargs(state, args), num_classes=num_classes)
    depth = len({k.split('.')[2] for k in state if k.startswith('stages.2.')})
    stem = state['downsample_layers.0.0.weight'].shape[0]
    names = [args['model']] if args.get('model') in SLAKS else []
    names += [name for name, (blocks, _) in SLAKS.items() if blocks == depth]
    given = [args['width_factor']] if args.get('width_factor') else []
    return [(name, dict(kwargs, width_factor=width)) for name in dict.fromkeys(names)
            for width in dict.fromkeys(given + [stem / SLAKS[name][1], *SLAK_WIDTHS])]


def _template(name, **kwargs):
    """Key -> shape of timm.create_model(name, **kwargs), built on the meta device (no memory)."""
    with warnings.catch_warnings(), torch.device('meta'):
        warnings.simplefilter('ignore')  # "Initializing zero-element tensors is a no-op"
        model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.numel()}


def _same_layout(state, template):
    return template.keys() == state.keys() and all(tuple(state[k].shape) == s for k, s in template.items())


def _match(state, candidates, what):
    """The first (name, kwargs) whose timm model has exactly the keys and shapes of state."""
    for name, kwargs in candidates:
        if _same_layout(state, _template(name, **kwargs)):
            return name, kwargs
    tried = ', '.join(dict.fromkeys(name for name, _ in candidates))
    raise ValueError(f'{what}: no timm model among {tried} has exactly its keys and shapes (first keys: '
                     f'{", ".join(list(state)[:4])}); export works for the models this repository trains')


def _run_args(ckpt):
    """The checkpoint's `args` as a dict (ours store a dict, official ones an argparse Namespace or, SparK, a
    string), else {}."""
    args = ckpt.get('args') or {}
    return args if isinstance(args, dict) else vars(args) if isinstance(args, argparse.Namespace) else {}


def _describe(family, raw, ckpt, state, num_classes):
    """What the checkpoint holds, in words: method, architecture, classifier."""
    head = f', fine-tuned ({num_classes} classes)' if num_classes else ''
    if family == 'vit':
        if any(k.startswith('hog_enc.') or re.match(r'norm\.\d+\.', k) for k in raw):
            method = 'LocalMIM + FreezeOut pretraining' if _run_args(ckpt).get('how_scale') else 'LocalMIM pretraining'
        else:
            method = 'MAE pretraining' if any(k.startswith(('decoder_', 'mask_token')) for k in raw) else 'ViT'
        depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
        return f'{method}{head}: ViT width {state["patch_embed.proj.weight"].shape[0]}, depth {depth}'
    if family in ('resnet', 'convnext'):
        whole = ckpt and any(k.startswith(SPARK_ENCODER) for k in (ckpt.get('model') or ckpt.get('module') or {}))
        return f'{"ResNet" if family == "resnet" else "ConvNeXt"} ' + \
            ('SparK pretraining (encoder kept)' if whole else 'encoder' if not num_classes else head[2:])
    if family == 'custom':
        return f'{_custom_name(ckpt)} (models/spark_custom_cnn.py)' + (head or ' encoder')
    return {'slak': f'SLaK{head}', 'r3d': 'SCE R3D-18 trunk (video)'}[family]


def _custom_name(ckpt):
    """The models/spark_custom_cnn.py model a checkpoint names (SparK's `arch`, our runs' `args.model`), or None."""
    names = [ckpt.get('arch'), _run_args(ckpt).get('model')] if ckpt else []
    return next((n for n in names if isinstance(n, str) and n in timm.list_models(module='spark_custom_cnn')), None)


def read_backbone(path, ema=False):
    """The Backbone of checkpoint `path` (ours or official); `ema`: its EMA weights instead."""
    ckpt, state = _load(path)
    if ema:
        state = _ema_state(ckpt, path)
    family = _family(state) or ('custom' if _custom_name(ckpt) else None)
    if family is None:
        raise ValueError(f'{path} holds no model export knows (a ViT, ResNet, ConvNeXt, SLaK or R3D-18; first keys: '
                         f'{", ".join(list(state)[:5])}): pass a checkpoint written by this repository or an '
                         f'official LocalMIM, MAE, SparK, SLaK or SCE release')
    args = _run_args(ckpt)
    if family == 'r3d':
        trunk = r3d_trunk_state_dict(state)
        kept = {prefix + k for k in trunk for prefix in ('trunk.model.', 'model.', '')}
        dropped = Counter(_group(k) for k in state if k not in kept)
        return Backbone(_describe(family, state, ckpt, trunk, 0), family, trunk, dropped=dropped,
                        notes=['no timm model exists for R3D-18: the layout is models/r3d.py\'s and the released '
                               'eztorch trunks\' (r3d18_trunk().model)'])
    notes, dropped = [], Counter()
    raw, prefix = state, CLASSIFIER[family]
    state = _fold_linprobe(state, prefix, notes)
    if family == 'vit':
        state = _vit(state, dropped, notes)
    elif family == 'slak':
        state = rename_old_keys(state)
    elif family == 'convnext' and 'head.norm.weight' not in state:
        state = _add_head_norm(state, notes)
    num_classes = state[prefix + 'weight'].shape[0] if prefix + 'weight' in state else 0
    what = _describe(family, raw, ckpt, state, num_classes)
    backbone = Backbone(what, family, state, num_classes=num_classes, dropped=dropped, notes=notes)
    if family == 'vit':
        _name_vit(backbone, state, path)
    elif family == 'custom':
        backbone.timm_name = _match(state, [(_custom_name(ckpt), dict(num_classes=num_classes))], path)[0]
    elif family == 'slak':
        candidates = _slak_candidates(state, args, num_classes)
        backbone.timm_name, backbone.timm_kwargs = _match(state, candidates, path)
        backbone.timm_kwargs.pop('num_classes')
    else:
        named = [n for n in (args.get('model'), ckpt.get('arch')) if isinstance(n, str) and family[:6] in n]
        pool = RESNETS if family == 'resnet' else CONVNEXTS
        candidates = [(n, dict(num_classes=num_classes)) for n in dict.fromkeys(named + list(pool))]
        backbone.timm_name = _match(state, candidates, path)[0]
    return backbone


def _name_vit(backbone, state, path):
    width, patch = state['patch_embed.proj.weight'].shape[0], state['patch_embed.proj.weight'].shape[-1]
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    name = VIT_NAMES.get((width, depth, patch))
    if name is None:
        raise ValueError(f'{path}: a ViT of width {width}, depth {depth}, patch {patch} has no timm name here '
                         f'(known: {", ".join(VIT_NAMES.values())})')
    side = round((state['pos_embed'].shape[1] - 1) ** 0.5)
    backbone.img_size = side * patch
    kwargs = {'global_pool': 'avg'} if 'fc_norm.weight' in state else {}
    if backbone.img_size != 224:  # built at the trained size, pos_embed loads as it is
        kwargs['img_size'] = backbone.img_size
        backbone.notes.append(f'pos_embed: {side}x{side} patches ({backbone.img_size} px), the model is built at that '
                              f'size; at another img_size timm resamples it (bicubic, antialiased)')
    _match(state, [(name, dict(kwargs, img_size=backbone.img_size, num_classes=backbone.num_classes))], path)
    backbone.timm_name, backbone.timm_kwargs = name, kwargs
