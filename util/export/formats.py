"""The files `export.py` writes from a Backbone (util/export/read.py), each with the lines that load it elsewhere.

- timm: the state dict; `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` loads it.
- safetensors: the same tensors in a .safetensors file (timm reads it under the same line).
- torchvision: a ResNet without `fc`, for `torchvision.models.resnet*()` and the body of a torchvision FPN backbone.
- detectron2: the pickle detectron2's DetectionCheckpointer reads (`model`: detectron2 names -> numpy arrays,
  `__author__`, `matching_heuristics`), as https://github.com/keyu-tian/SparK/tree/main/downstream_d2 converts its
  ResNets; a ViT under ViTDet's `backbone.net.*` names with `pos_embed` at ViTDet's 224 px pretraining grid.
"""
import os
import pickle
import re

import timm
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from util.checkpoint import atomic_save
from util.export.read import read_backbone

TORCHVISION_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
DETECTRON2_RESNETS = TORCHVISION_RESNETS  # the depths of detectron2's build_resnet_backbone
VITDET_PRETRAIN_SIZE = 224  # ViTDet's ViT(pretrain_img_size=224, pretrain_use_cls_token=True)
SUFFIX = {'safetensors': '.safetensors', 'detectron2': '.pkl'}  # the names timm and detectron2 recognise


def _atomic(out, write):
    tmp = f'{out}.tmp.{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _loader(out):
    if out.endswith('.safetensors'):
        return 'safetensors.torch.load_file', f'safetensors.torch.load_file({out!r})'
    return 'torch', f'torch.load({out!r})'


def _timm_lines(backbone, out):
    module, load = _loader(out)
    imports = 'import timm, torch' + (', safetensors.torch' if module != 'torch' else '')
    if backbone.family == 'r3d':
        return [imports, 'from models.r3d import r3d18_trunk  # from this repository', 'trunk = r3d18_trunk()',
                f'trunk.model.load_state_dict({load})']
    kwargs = ''.join(f', {k}={v!r}' for k, v in backbone.timm_kwargs.items())
    if backbone.family in ('slak', 'custom'):  # our factories build the model only; the weights load as a state dict
        return [imports + ', models  # from this repository: importing models registers SLaK_* and your_convnet*',
                f'model = timm.create_model({backbone.timm_name!r}, num_classes={backbone.num_classes or 1000}'
                f'{kwargs})', f'model.load_state_dict({load}, strict={bool(backbone.num_classes)})']
    # num_classes in the overlay: timm keeps the file's classifier when yours has as many classes, else starts one
    overlay = f'file={out!r}, num_classes={backbone.num_classes}'
    cfg = timm.get_pretrained_cfg(backbone.timm_name)
    if (tuple(cfg.mean), tuple(cfg.std)) != (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD):
        overlay += f', mean={IMAGENET_DEFAULT_MEAN}, std={IMAGENET_DEFAULT_STD}'  # what our models trained with
    lines = ['import timm', f'model = timm.create_model({backbone.timm_name!r}, pretrained=True{kwargs}, '
             f'num_classes={backbone.num_classes or 1000}, pretrained_cfg_overlay=dict({overlay}))']
    if backbone.img_size:
        lines.append(f'# trained at img_size={backbone.img_size}. At another size timm resamples pos_embed bicubic '
                     f'with antialiasing; run_finetune.py --finetune resamples it as MAE does, without: features then '
                     f'differ by about 1e-2')
    return lines


def write_timm(backbone, out):
    atomic_save(backbone.state, out)
    return _timm_lines(backbone, out)


def write_safetensors(backbone, out):
    metadata = {'format': 'pt', 'timm_name': backbone.timm_name or 'r3d18_trunk'}
    _atomic(out, lambda tmp: save_file({k: v.contiguous() for k, v in backbone.state.items()}, tmp, metadata))
    return _timm_lines(backbone, out)


def write_torchvision(backbone, out):
    name = backbone.timm_name
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f'--format torchvision takes the ResNets torchvision has ({", ".join(TORCHVISION_RESNETS)}); '
                         f'this checkpoint holds {backbone.what} ({name or "no timm model"}): use --format timm')
    atomic_save({k: v for k, v in backbone.state.items() if not k.startswith('fc.')}, out)
    lines = ['import torch, torchvision', f'model = torchvision.models.{name}(num_classes=1000)',
             f'model.load_state_dict(torch.load({out!r}), strict=False)  # missing: fc.weight, fc.bias only']
    if name == 'resnet50':
        lines.append('detector = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, '
                     'weights_backbone=None, num_classes=91)')
    else:
        lines.append('detector = torchvision.models.detection.MaskRCNN(torchvision.models.detection.backbone_utils.'
                     f'resnet_fpn_backbone(backbone_name={name!r}, weights=None), num_classes=91)')
    return lines + [f'detector.backbone.body.load_state_dict(torch.load({out!r}))']


def detectron2_resnet_name(key):
    """A timm/torchvision ResNet key -> detectron2's: stem.conv1(.norm), resN.B.convK(.norm), resN.B.shortcut(.norm)."""
    block = re.match(r'layer(\d)\.(\d+)\.(.*)$', key)
    if block is None:
        return 'stem.' + re.sub(r'^bn1\.', 'conv1.norm.', key)
    stage, index, rest = block.groups()
    rest = re.sub(r'^bn(\d)\.', r'conv\1.norm.', rest)
    rest = re.sub(r'^downsample\.0\.', 'shortcut.', re.sub(r'^downsample\.1\.', 'shortcut.norm.', rest))
    return f'res{int(stage) + 1}.{index}.{rest}'


def _vitdet_state(backbone):
    grid = VITDET_PRETRAIN_SIZE // backbone.state['patch_embed.proj.weight'].shape[-1]
    state = {}
    for k, v in backbone.state.items():
        if k == 'pos_embed' and v.shape[1] != grid * grid + 1:
            v = resample_abs_pos_embed(v, [grid, grid], num_prefix_tokens=1, interpolation='bicubic',
                                       antialias=False)
        elif not k.startswith(('pos_embed', 'patch_embed.', 'blocks.')):
            continue  # ViTDet has no cls token, final norm or classifier
        state['backbone.net.' + k] = v
    return state


def write_detectron2(backbone, out):
    if backbone.family == 'resnet' and backbone.timm_name not in DETECTRON2_RESNETS:
        raise ValueError(f'--format detectron2: detectron2 builds ResNets of depth '
                         f'{", ".join(n.removeprefix("resnet") for n in DETECTRON2_RESNETS)}; this checkpoint holds a '
                         f'{backbone.timm_name}: use --format timm')
    if backbone.family == 'resnet':
        state = {detectron2_resnet_name(k): v for k, v in backbone.state.items() if not k.startswith('fc.')}
    elif backbone.family == 'vit':
        state = _vitdet_state(backbone)
    else:
        raise ValueError(f'--format detectron2 takes ResNets and ViTs; this checkpoint holds {backbone.what}: use '
                         f'--format timm')
    payload = {'model': {k: v.detach().cpu().numpy() for k, v in state.items()}, '__author__': 'export.py',
               'matching_heuristics': True}

    def dump(tmp):
        with open(tmp, 'wb') as f:
            pickle.dump(payload, f)
    _atomic(out, dump)
    if backbone.family == 'vit':
        blocks = len({k.split('.')[1] for k in backbone.state if k.startswith('blocks.')})
        return [f'ViTDet (projects/ViTDet LazyConfig): train.init_checkpoint = {out!r}; model.backbone.net: embed_dim='
                f'{backbone.state["pos_embed"].shape[-1]}, depth={blocks}, img_size=1024, pretrain_img_size=224']
    depth = int(backbone.timm_name.removeprefix('resnet'))
    small = ' MODEL.RESNETS.RES2_OUT_CHANNELS 64' if depth < 50 else ''
    return [f'detectron2 config flags: MODEL.WEIGHTS {out} MODEL.RESNETS.DEPTH {depth}{small} MODEL.RESNETS.'
            'STRIDE_IN_1X1 False INPUT.FORMAT RGB MODEL.PIXEL_MEAN "[123.675, 116.280, 103.530]" '
            'MODEL.PIXEL_STD "[58.395, 57.120, 57.375]"']


WRITERS = {'timm': write_timm, 'torchvision': write_torchvision, 'detectron2': write_detectron2,
           'safetensors': write_safetensors}
FORMATS = tuple(WRITERS)


def export(path, fmt, out, ema=False, log=print):
    """Reads checkpoint `path`, writes its backbone as `fmt` to `out`; logs what it found and how to load it."""
    if fmt not in WRITERS:
        raise ValueError(f'--format {fmt!r}: choose one of {", ".join(FORMATS)}')
    if fmt in SUFFIX and not out.endswith(SUFFIX[fmt]):
        raise ValueError(f'--out {out}: a {fmt} file must end with {SUFFIX[fmt]} (the name {fmt} recognises it by)')
    if fmt not in SUFFIX and out.endswith(tuple(SUFFIX.values())):
        raise ValueError(f'--out {out}: --format {fmt} writes a torch file (.pth); --format safetensors writes '
                         f'.safetensors, --format detectron2 .pkl')
    backbone = read_backbone(path, ema)
    for line in backbone.summary():
        log(line)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lines = WRITERS[fmt](backbone, os.path.abspath(out))  # the printed lines work from any folder
    log(f'wrote {out}; to load it:')
    for line in lines:
        log('  ' + line)
    return backbone
