"""Key names and parameter order of the official (facebookresearch) ConvNeXt <-> timm's ConvNeXt.

SparK's official ConvNeXt files use the official names; this repository builds timm's ConvNeXt, whose
tensors are the same (same shapes, also for timm's conv-MLP variants) under the names of `_NAME_PAIRS`.

The official model registers all downsample layers (stem first) before all stages; that is the parameter
order of an official optimizer state, which `official_convnext_order` reproduces.
"""
import re

# (official, timm) name pairs, tried in order; {d} is one digit, {n} a number, both copied across. A name
# ending in '.' is a prefix, any other a whole key.
_NAME_PAIRS = [
    ('downsample_layers.0.{d}.', 'stem.{d}.'),
    ('downsample_layers.{d}.{d}.', 'stages.{d}.downsample.{d}.'),
    ('stages.{n}.{n}.dwconv.', 'stages.{n}.blocks.{n}.conv_dw.'),
    ('stages.{n}.{n}.pwconv{d}.', 'stages.{n}.blocks.{n}.mlp.fc{d}.'),
    ('stages.{n}.{n}.norm.', 'stages.{n}.blocks.{n}.norm.'),
    ('stages.{n}.{n}.gamma', 'stages.{n}.blocks.{n}.gamma'),
    ('norm.', 'head.norm.'),
    ('head.weight', 'head.fc.weight'),
    ('head.bias', 'head.fc.bias'),
]


def _rule(source, target):
    """(compiled pattern, replacement) renaming `source` names to `target` names."""
    parts = re.split(r'\{([dn])\}', source)  # literal, kind, literal, kind, ..., literal
    pattern = ''.join(re.escape(p) if i % 2 == 0 else r'(\d)' if p == 'd' else r'(\d+)' for i, p in enumerate(parts))
    groups = iter(range(1, len(parts) // 2 + 1))
    replacement = re.sub(r'\{[dn]\}', lambda _: rf'\g<{next(groups)}>', target)
    return re.compile('^' + pattern + ('' if source.endswith('.') else '$')), replacement


_TO_TIMM = [_rule(official, timm) for official, timm in _NAME_PAIRS]
_TO_OFFICIAL = [_rule(timm, official) for official, timm in _NAME_PAIRS]


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
    """Official ConvNeXt keys: `downsample_layers.*` and blocks with a `dwconv` (SLaK has only the first)."""
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
