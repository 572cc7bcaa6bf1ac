"""Key names and parameter order of the official (facebookresearch) ConvNeXt <-> timm's ConvNeXt.

SparK's official ConvNeXt files (`convnext_*_1kpretrained_timm_style.pth`, and the encoder part of
`*_withdecoder_1kpretrained_spark_style.pth` under `sparse_encoder.sp_cnn.`) use the official names;
this repository builds timm's ConvNeXt, whose tensors are the same under other names:

    official                       timm
    downsample_layers.0.{0,1}      stem.{0,1}
    downsample_layers.i.{0,1}      stages.i.downsample.{0,1}        (i = 1, 2, 3)
    stages.i.j.dwconv / pwconv1 / pwconv2 / norm / gamma
                                   stages.i.blocks.j.conv_dw / mlp.fc1 / mlp.fc2 / norm / gamma
    norm / head (classifier)       head.norm / head.fc

Only names change, never shapes (timm's conv-MLP variants, convnext_atto..nano, keep their 1x1-conv
weights; the official code has no such model). The official model also registers its modules in another
order (all downsample layers, stem first, before all stages), which is the order of an official
optimizer state: `official_convnext_order` sorts timm names into it.
"""
import re

_TO_TIMM = [
    (re.compile(r'^downsample_layers\.0\.(\d)\.'), r'stem.\1.'),
    (re.compile(r'^downsample_layers\.(\d)\.(\d)\.'), r'stages.\1.downsample.\2.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.dwconv\.'), r'stages.\1.blocks.\2.conv_dw.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.pwconv(\d)\.'), r'stages.\1.blocks.\2.mlp.fc\3.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)'), r'stages.\1.blocks.\2.\3'),
    (re.compile(r'^norm\.'), 'head.norm.'),
    (re.compile(r'^head\.(weight|bias)$'), r'head.fc.\1'),
]
_TO_OFFICIAL = [
    (re.compile(r'^stem\.(\d)\.'), r'downsample_layers.0.\1.'),
    (re.compile(r'^stages\.(\d)\.downsample\.(\d)\.'), r'downsample_layers.\1.\2.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.'), r'stages.\1.\2.dwconv.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.'), r'stages.\1.\2.pwconv\3.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(norm\.|gamma$)'), r'stages.\1.\2.\3'),
    (re.compile(r'^head\.norm\.'), 'norm.'),
    (re.compile(r'^head\.fc\.(weight|bias)$'), r'head.\1'),
]


def _rename(key, rules, prefix):
    if not key.startswith(prefix):
        return key
    rest = key[len(prefix):]
    for pattern, repl in rules:
        rest, hit = pattern.subn(repl, rest)
        if hit:
            break
    return prefix + rest


def is_official_convnext(state_dict, prefix=''):
    """Official ConvNeXt keys: `downsample_layers.*` and blocks with a `dwconv` (SLaK shares the first, not the second)."""
    return any(k.startswith(prefix + 'stages.') and '.dwconv.' in k for k in state_dict) and \
        any(k.startswith(prefix + 'downsample_layers.') for k in state_dict)


def official_to_timm_key(key, prefix=''):
    return _rename(key, _TO_TIMM, prefix)


def timm_to_official_key(key, prefix=''):
    return _rename(key, _TO_OFFICIAL, prefix)


def convnext_official_to_timm(state_dict, prefix=''):
    """A copy of state_dict with the official ConvNeXt keys under `prefix` renamed to timm's; other keys
    (timm names already, decoder, ...) are kept as they are."""
    return {official_to_timm_key(k, prefix): v for k, v in state_dict.items()}


def convnext_timm_to_official(state_dict, prefix=''):
    """The inverse of convnext_official_to_timm (same tensors, official names)."""
    return {timm_to_official_key(k, prefix): v for k, v in state_dict.items()}


def official_convnext_order(names, prefix=''):
    """timm ConvNeXt names (under `prefix`) sorted into the official registration order: stem and downsample
    layers by stage, then the blocks by stage, then the head; names outside `prefix` keep their place after
    them (a stable sort: the order inside a layer or block is the same in both models)."""
    def rank(name):
        if not name.startswith(prefix):
            return (3, 0)
        parts = name[len(prefix):].split('.')
        if parts[0] == 'stem':
            return (0, 0)
        if parts[0] == 'stages' and len(parts) > 2:
            return (0, int(parts[1])) if parts[2] == 'downsample' else (1, int(parts[1]))
        return (2, 0)
    return sorted(names, key=rank)
