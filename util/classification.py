"""Pieces of supervised classification training shared by the entry scripts (run_finetune.py, main_slak.py).

timm's Mixup/CutMix and the matching criterion (cross-entropy or, with --bce, timm's BinaryCrossEntropy), the
layer-decay depths of ConvNeXt (BEiT-style, as ConvNeXt, SLaK and SparK use them; SparK's ResNet depths are in
util/spark/layer_decay.py), and ConvNeXt-style parameter groups (SLaK's optimizer): no weight decay for 1-D parameters and biases, and optional
layer-wise lr decay over ConvNeXt's 12 depth groups.
"""
import functools

import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


def add_augmentation_args(parser, color_jitter=None, mixup=0.0, cutmix=0.0):
    """timm's augmentation, random erasing and Mixup/CutMix flags (MAE's and ConvNeXt's names and defaults, but
    for the defaults given here)."""
    parser.add_argument('--color_jitter', type=float, default=color_jitter, metavar='PCT')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help="timm's auto-augment name (rand-..., augmix-..., v0, original), ta_wide (torchvision's "
                             'TrivialAugmentWide) or none')
    parser.add_argument('--smoothing', type=float, default=0.1)
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT')
    parser.add_argument('--remode', type=str, default='pixel')
    parser.add_argument('--recount', type=int, default=1)
    parser.add_argument('--mixup', type=float, default=mixup)
    parser.add_argument('--cutmix', type=float, default=cutmix)
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None)
    parser.add_argument('--mixup_prob', type=float, default=1.0)
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5)
    parser.add_argument('--mixup_mode', type=str, default='batch')
    return parser


def build_mixup(args):
    """timm Mixup/CutMix from the official flags (--mixup, --cutmix, ...), or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def build_criterion(args, mixup_fn):
    """With `args.bce` (SparK's ResNet recipe) timm's BinaryCrossEntropy, which takes integer or mixed soft targets;
    otherwise cross-entropy: soft-target under mixup, label-smoothed with --smoothing > 0, plain otherwise."""
    if getattr(args, 'bce', False):  # under mixup the smoothing already is in the targets
        return BinaryCrossEntropy(smoothing=0.0 if mixup_fn is not None else args.smoothing)
    if mixup_fn is not None:  # smoothing happens inside Mixup
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()


def convnext_layer_id(name, num_layers=12):
    """ConvNeXt's layer-decay depth of a parameter: the stem 0; stages 0 and 1 (and the downsampling into
    stages 1 and 2) 1 to 3; stage 2 3 + block // 3; stage 3 and its downsampling `num_layers`; the final
    norm and the head `num_layers + 1`."""
    parts = name.split('.')
    if parts[0] not in ('downsample_layers', 'stages'):
        return num_layers + 1
    stage = int(parts[1])
    if stage == 3:
        return num_layers
    if parts[0] == 'downsample_layers':
        return 0 if stage == 0 else stage + 1
    return stage + 1 if stage < 2 else 3 + int(parts[2]) // 3


def timm_convnext_layer_id(name, num_layers):
    """`convnext_layer_id` of a parameter of timm's ConvNeXt (stem, stages.i.downsample, stages.i.blocks.j, head)."""
    parts = name.split('.')
    if parts[0] == 'stem':
        return convnext_layer_id('downsample_layers.0', num_layers)
    if parts[0] == 'stages':
        if parts[2] == 'downsample':
            return convnext_layer_id(f'downsample_layers.{parts[1]}', num_layers)
        return convnext_layer_id(f'stages.{parts[1]}.{parts[3]}', num_layers)
    return num_layers + 1


def layer_decay_param_groups(model, weight_decay, layer_decay, layer_id, num_layers):
    """Groups in order of first appearance (so an official optimizer state loads): 'decay' and 'no_decay'
    (1-D or '.bias'), one pair per depth when layer_decay != 1, with lr_scale layer_decay ** (num_layers + 1 - depth),
    where `layer_id(name)` gives a parameter's depth in 0 .. num_layers + 1."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith('.bias')
        depth = layer_id(name) if layer_decay != 1 else num_layers + 1
        if (depth, no_decay) not in groups:
            groups[depth, no_decay] = {'params': [], 'weight_decay': 0.0 if no_decay else weight_decay,
                                       'lr_scale': layer_decay ** (num_layers + 1 - depth)}
        groups[depth, no_decay]['params'].append(param)
    return list(groups.values())


def convnext_param_groups(model, weight_decay, layer_decay=1.0, num_layers=12):
    """`layer_decay_param_groups` over the official ConvNeXt's depths (`convnext_layer_id`)."""
    return layer_decay_param_groups(model, weight_decay, layer_decay,
                                    functools.partial(convnext_layer_id, num_layers=num_layers), num_layers)
