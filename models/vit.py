"""The fine-tuning ViTs of MAE and LocalMIM (`models_vit.py`), as timm `VisionTransformer`s.

Registered under the official names (`vit_base_patch16`, ...), so `--model vit_base_patch16` works as
in the official commands. The official class subclasses timm 0.3.2's ViT and overrides
`forward_features`, which breaks on current timm; timm 1.0 already has both of its
pooling modes, so we only configure it:

- `global_pool=True` (the default, MAE's): mean of the patch tokens (cls excluded), then `fc_norm`;
  there is no final `norm` -> timm `global_pool='avg'`.
- `global_pool=False` (`--cls_token`): the cls token after the final `norm`; no `fc_norm`
  -> timm `global_pool='token'`.

The state-dict keys are those of `models_vit`: `cls_token, pos_embed, patch_embed.proj.*, blocks.N.*`,
then `fc_norm.*` (global pool) or `norm.*` (cls token), and `head.{weight,bias}`. drop_path rises
linearly from 0 to `drop_path_rate` over the blocks, as in the official code.
"""
from functools import partial

import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from models.factory import model_kwargs


FINETUNE_VITS = ('vit_tiny_patch16', 'vit_small_patch16', 'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14')


class FinetuneViT(VisionTransformer):
    """timm's ViT with MAE's layer-decay grouping (`param_groups_lrd`): the final `norm` shares the
    head's layer id (scale 1) instead of the last block's, as timm would group it."""

    def group_matcher(self, coarse=False):
        return dict(stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre', blocks=[(r'^blocks\.(\d+)', None)])


def _create(pretrained, global_pool=True, **kwargs):
    kwargs = model_kwargs(pretrained, kwargs, 'pass a pretraining checkpoint with --finetune')
    if isinstance(global_pool, bool):
        global_pool = 'avg' if global_pool else 'token'
    if global_pool not in ('avg', 'token'):
        raise ValueError(f"global_pool must be True (mean of patch tokens), False (cls token), 'avg' or "
                         f"'token', got {global_pool!r}")
    return FinetuneViT(global_pool=global_pool, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


@register_model
def vit_tiny_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=192, depth=12, num_heads=3, **kwargs)


@register_model
def vit_small_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=384, depth=12, num_heads=6, **kwargs)


@register_model
def vit_base_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


@register_model
def vit_large_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


@register_model
def vit_huge_patch14(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)
