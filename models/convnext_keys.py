"""Key names of the official (facebookresearch) ConvNeXt <-> timm's ConvNeXt.

SparK's official ConvNeXt files (`convnext_*_1kpretrained_timm_style.pth`, and the encoder part of
`*_withdecoder_1kpretrained_spark_style.pth` under `sparse_encoder.sp_cnn.`) use the official names;
this repository builds timm's ConvNeXt, whose tensors are the same under other names:

    downsample_layers.0.{0,1}      stem.{0,1}
    downsample_layers.i.{0,1}      stages.i.downsample.{0,1}        (i = 1, 2, 3)
    stages.i.j.dwconv / pwconv1 / pwconv2 / norm / gamma
                                   stages.i.blocks.j.conv_dw / mlp.fc1 / mlp.fc2 / norm / gamma
    norm / head (classifier)       head.norm / head.fc
"""
import re

_RULES = [
    (re.compile(r'^downsample_layers\.0\.(\d)\.'), r'stem.\1.'),
    (re.compile(r'^downsample_layers\.(\d)\.(\d)\.'), r'stages.\1.downsample.\2.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.dwconv\.'), r'stages.\1.blocks.\2.conv_dw.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.pwconv(\d)\.'), r'stages.\1.blocks.\2.mlp.fc\3.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)'), r'stages.\1.blocks.\2.\3'),
    (re.compile(r'^norm\.'), 'head.norm.'),
    (re.compile(r'^head\.(weight|bias)$'), r'head.fc.\1'),
]


def is_official_convnext(state_dict, prefix=''):
    """Official ConvNeXt keys: `downsample_layers.*` and blocks with a `dwconv` (SLaK shares the first, not the second)."""
    return any(k.startswith(prefix + 'stages.') and '.dwconv.' in k for k in state_dict) and \
        any(k.startswith(prefix + 'downsample_layers.') for k in state_dict)


def convnext_official_to_timm(state_dict, prefix=''):
    """A copy of state_dict with the official ConvNeXt keys under `prefix` renamed to timm's; other keys
    (timm names already, decoder, ...) are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for pattern, repl in _RULES:
                rest, hit = pattern.subn(repl, rest)
                if hit:
                    break
            key = prefix + rest
        out[key] = value
    return out
