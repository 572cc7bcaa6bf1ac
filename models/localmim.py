"""LocalMIM: masked image modeling with multi-scale HOG targets reconstructed from several encoder depths.

An MAE encoder (timm PatchEmbed + Blocks) on the visible 25% of patches is tapped after four blocks
(`ID = [1, 3, depth-3, depth-1]`); each tap has its own LayerNorm and a light decoder (`MAE_Decoder`)
that predicts HOG histograms at 4x, 2x, 1x and 0.5x the patch grid. The loss is the sum over scales
of the MSE on masked positions. Parameter names equal the official `models_mim.py`, so released
checkpoints load with strict=True in both directions (FreezeOut's experimental feature target adds
`decoder.k.feature_pred`, only when asked for).
"""
import contextlib
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block

from models.factory import model_kwargs
from models.grad_ckpt import checkpointed
from models.layers import LayerNorm2d
from models.hog import HOGLayer
from models.pos_embed import get_2d_sincos_pos_embed

SCALES = (4.0, 2.0, 1.0, 0.5)  # decoder output grid relative to the patch grid, per tap


def _init_linear_and_norm(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _prediction_head(scale, dim, out_dim):
    """The per-scale `pred` Sequential; its indices are part of the official state-dict keys."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2), nn.Conv2d(dim // 4, out_dim, 1))
    if scale == 2.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.Conv2d(dim // 2, out_dim, 1))
    if scale == 1.0:
        return nn.Sequential(nn.Conv2d(dim, out_dim, 1))
    if scale == 0.5:
        return nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(dim, out_dim, 1))
    raise ValueError(f'unsupported LocalMIM scale {scale}')


class MAE_Decoder(nn.Module):
    """Fills in mask tokens, runs one transformer block on the full grid, predicts one HOG scale."""

    def __init__(self, in_dim, grid_size, scale, out_dim, embed_dim=256, depth=1, num_heads=8,
                 mlp_ratio=4., norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.grid_size = grid_size
        self.grad_checkpointing = False
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size ** 2 + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.pred = _prediction_head(scale, embed_dim, out_dim)
        self.feature_pred = None  # --feature_target features|both: decoder width -> encoder width, per token
        pos = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        nn.init.normal_(self.mask_token, std=.02)
        self.apply(_init_linear_and_norm)

    def forward(self, x, ids_restore):
        """[B, 1 + visible, D] latent -> [B, h * w, out_dim] predictions in row-major order."""
        return self.predict_hog(self.decode(x, ids_restore))

    def decode(self, x, ids_restore):
        """[B, 1 + visible, D] latent -> [B, h * w, embed_dim] decoded patch tokens in row-major order."""
        x = self.embed(x)
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], num_masked, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = checkpointed(blk, x) if self.grad_checkpointing else blk(x)
        return self.norm(x)[:, 1:]

    def predict_hog(self, tokens):
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid_size, self.grid_size)
        return self.pred(x).flatten(2).transpose(1, 2)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), hog_nbins=9, hog_bias=False):
        super().__init__()
        if img_size % patch_size or (img_size // patch_size) % 2:
            raise ValueError(f'input size {img_size} does not fit patch size {patch_size}: LocalMIM needs a '
                             f'multiple of {patch_size} with an even patch grid (e.g. {14 * patch_size}); '
                             f'change --input_size')
        if depth < 4:
            raise ValueError(f'LocalMIM taps blocks 1, 3, depth-3 and depth-1: depth must be >= 4, got {depth}')
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.grad_checkpointing = False
        self.ID = [1, 3, depth - 3, depth - 1]
        self.scale = list(SCALES)
        self.hog_nbins = hog_nbins

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2 + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = nn.ModuleList([norm_layer(embed_dim) for _ in self.ID])
        self._init_encoder()

        out_dim = in_chans * hog_nbins
        self.decoder = nn.ModuleList([
            MAE_Decoder(embed_dim, self.grid_size, s, out_dim, decoder_embed_dim, decoder_depth,
                        decoder_num_heads, mlp_ratio, norm_layer) for s in self.scale])
        # HOG cells of patch/scale pixels: 4, 8, 16, 32 for patch 16 (the official sizes).
        self.hog_enc = nn.ModuleList([HOGLayer(hog_nbins, max(1, int(patch_size / s)), hog_bias)
                                      for s in self.scale])

    def _init_encoder(self):
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=.02)
        self.apply(_init_linear_and_norm)

    def set_grad_checkpointing(self, enable=True):
        """Recompute the activations of the trained encoder blocks and of the decoder blocks in the backward
        pass (timm's convention): less memory for about a third more compute. Blocks frozen by FreezeOut run
        without autograd and store nothing anyway."""
        self.grad_checkpointing = enable
        for decoder in self.decoder:
            decoder.grad_checkpointing = enable

    def target_grid(self, k):
        side = int(self.grid_size * self.scale[k])
        return side, side

    def HOG(self, imgs, k, hist=None):
        """[B, 3, H, W] -> [B, h * w, 3 * nbins] HOG target of scale k, always in float32.
        `hist`: the per-pixel histograms, shared by all scales when the HOG filters have no bias."""
        with torch.autocast(imgs.device.type, enabled=False):
            hog = self.hog_enc[k](imgs.float(), out_size=self.target_grid(k), hist=hist)
        return hog.flatten(2).transpose(1, 2)

    def shared_histogram(self, imgs):
        """Per-pixel histograms computed once for every scale, or None when each scale's filter has its own
        (random, frozen) bias (--hog_bias): the four scales then differ before pooling."""
        if self.hog_enc[0].conv.bias is not None:
            return None
        with torch.autocast(imgs.device.type, enabled=False):
            return self.hog_enc[0].histogram(imgs.float())

    def recal_mask(self, mask, k):
        """Patch mask [B, L] -> mask on scale k's grid: repeated blocks (scale >= 1) or 2x2 means."""
        m = mask.reshape(-1, 1, self.grid_size, self.grid_size)
        s = self.scale[k]
        m = F.interpolate(m, scale_factor=int(s), mode='nearest') if s >= 1 else F.avg_pool2d(m, int(1 / s))
        return m.flatten(1)

    def random_masking(self, x, mask_ratio, noise=None):
        """MAE's per-sample shuffle: the patches with the smallest `noise` are kept."""
        N, L, D = x.shape
        if not 0 <= mask_ratio < 1:  # else the slicing below silently keeps the wrong patches
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif noise.shape != (N, L):
            raise ValueError(f'noise must have shape {(N, L)}, got {tuple(noise.shape)}')
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    # FreezeOut units: 0 = patch embedding + cls token, i >= 1 = block i-1. The first `frozen_units`
    # run without autograd, and stage k (tap norm, decoder, HOG target, loss) is skipped once the
    # block it reads, unit ID[k] + 1, is frozen: it could no longer teach the encoder anything.
    frozen_units = 0

    # --feature_target features|both (util/freezeout/feature_masking.py): the active stages also predict the stored
    # frozen-depth features of the masked tokens, through each decoder's `feature_pred`.
    feature_target = 'hog'

    def active_stages(self):
        return [k for k, tap in enumerate(self.ID) if tap + 1 >= self.frozen_units]

    def add_feature_heads(self, feature_target):
        """Adds `decoder.k.feature_pred` (a linear map to the encoder width) for the feature target. Their
        initialisation draws from a forked RNG, so the run's other random draws (masks) are unchanged."""
        if feature_target not in ('hog', 'features', 'both'):
            raise ValueError(f'--feature_target must be hog, features or both, got {feature_target!r}')
        self.feature_target = feature_target
        if feature_target == 'hog':
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for decoder in self.decoder:
                decoder.feature_pred = nn.Linear(decoder.embed.out_features, self.pos_embed.shape[-1])
                decoder.feature_pred.apply(_init_linear_and_norm)

    def _with_cls(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_prefix(self, imgs, mask_ratio, noise=None):
        """Embedding, masking, cls token and the frozen blocks: (tokens, mask, ids_restore)."""
        with torch.no_grad() if self.frozen_units else contextlib.nullcontext():
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            x = self._with_cls(x)
            for blk in self.blocks[:max(self.frozen_units - 1, 0)]:
                x = blk(x)
        return x, mask, ids_restore

    @torch.no_grad()
    def frozen_features(self, imgs):
        """Feature masking: the frozen prefix on the UNMASKED image, [B, 1 + L, D] (cls token, then every patch in
        row-major order). Past one frozen block the patch tokens have attended to each other: see docs/FREEZEOUT.md."""
        x = self._with_cls(self.patch_embed(imgs) + self.pos_embed[:, 1:])
        for blk in self.blocks[:max(self.frozen_units - 1, 0)]:
            x = blk(x)
        return x

    @torch.no_grad()
    def advance_frozen(self, x, from_units, to_units):
        """Tokens [B, 1 + N, D] after `from_units` frozen units (`forward_prefix` or `frozen_features` output) carried
        through the frozen blocks up to `to_units`: a full recomputation's result, for the price of the blocks in
        between. Half-precision stored tokens continue in float32, as the residual stream of a recomputation does."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        for blk in self.blocks[max(from_units - 1, 0):max(to_units - 1, 0)]:
            x = blk(x)
        return x

    @torch.no_grad()
    def pooled_features(self, imgs):
        """[B, D]: the mean patch token of the whole (unmasked) image after the last block and its tap norm, as
        the exported timm ViT computes it (k-NN monitoring)."""
        x = self._with_cls(self.patch_embed(imgs) + self.pos_embed[:, 1:])
        for blk in self.blocks:
            x = blk(x)
        return self.norm[-1](x)[:, 1:].mean(1)

    def mask_features(self, features, mask_ratio, noise):
        """Feature masking: a `forward_prefix`-like (tokens, mask, ids_restore) from `frozen_features` output. The
        patches with the smallest `noise` stay visible, kept in their row-major order after the cls token."""
        N, L = noise.shape
        keep = torch.argsort(noise, dim=1)[:, :int(L * (1 - mask_ratio))]
        masked = torch.ones_like(noise).scatter_(1, keep, 0.0)
        in_order = torch.arange(L, device=noise.device) + L * masked  # visible first, each group in position order
        x, mask, ids_restore = self.random_masking(features[:, 1:], mask_ratio, in_order)
        return torch.cat([features[:, :1], x], dim=1), mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None, prefix=None):
        """The tapped latents [B, 1 + visible, D] (None for skipped stages), patch mask [B, L], ids_restore.
        `prefix`: a `forward_prefix` result computed earlier (FreezeOut's feature cache)."""
        x, mask, ids_restore = prefix if prefix is not None else self.forward_prefix(imgs, mask_ratio, noise)
        latents = [None] * len(self.ID)
        for i in range(max(self.frozen_units - 1, 0), len(self.blocks)):
            x = checkpointed(self.blocks[i], x) if self.grad_checkpointing else self.blocks[i](x)
            for k, tap in enumerate(self.ID):
                if tap == i:
                    latents[k] = self.norm[k](x)
        return latents, mask, ids_restore

    @staticmethod
    def forward_loss(pred, target, mask):
        """Mean over channels of the squared error, averaged over positions weighted by `mask`."""
        loss = (pred.float() - target).pow(2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def predict(self, imgs, mask_ratio=0.75, noise=None, prefix=None):
        """Patch mask [B, L] and, per scale, (prediction, HOG target, mask) on that scale's grid
        (None for a stage skipped by FreezeOut)."""
        latents, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, prefix)
        hist = self.shared_histogram(imgs)
        outputs = [(self.decoder[k](latents[k], ids_restore), self.HOG(imgs, k, hist), self.recal_mask(mask, k))
                   if latents[k] is not None else None for k in range(len(self.scale))]
        return mask, outputs

    def feature_masking_losses(self, imgs, prefix, features):
        """Per-stage losses of feature masking: HOG of the masked patches and/or (`feature_target`) the frozen-depth
        `features` [B, 1 + L, D] of the masked tokens, normalised per token (a LayerNorm without affine)."""
        latents, mask, ids_restore = self.forward_encoder(imgs, None, prefix=prefix)
        hog = self.feature_target in ('hog', 'both')
        hist = self.shared_histogram(imgs) if hog else None
        if self.feature_target != 'hog':
            target = F.layer_norm(features[:, 1:].float(), features.shape[-1:], eps=1e-6)
        losses = {}
        for k, s in enumerate(self.scale):
            if latents[k] is None:
                continue
            tokens = self.decoder[k].decode(latents[k], ids_restore)
            if hog:
                pred = self.decoder[k].predict_hog(tokens)
                losses[f'loss_scale{s:g}'] = self.forward_loss(pred, self.HOG(imgs, k, hist), self.recal_mask(mask, k))
            if self.feature_target != 'hog':
                losses[f'loss_feat{s:g}'] = self.forward_loss(self.decoder[k].feature_pred(tokens), target, mask)
        return losses

    def forward(self, imgs, mask_ratio=0.75, noise=None, prefix=None, features=None):
        """Total loss (sum over the active scales) and a dict of the per-scale losses for logging. `features`
        (with `prefix` from `mask_features`): feature masking's stored frozen-depth features."""
        if features is not None:
            losses = self.feature_masking_losses(imgs, prefix, features)
        else:
            _, outputs = self.predict(imgs, mask_ratio, noise, prefix)
            losses = {f'loss_scale{s:g}': self.forward_loss(*out) for s, out in zip(self.scale, outputs)
                      if out is not None}
        return sum(losses.values()), {name: loss.detach() for name, loss in losses.items()}


def _create(pretrained, **kwargs):
    kwargs = model_kwargs(pretrained, kwargs, 'load a LocalMIM checkpoint with --resume')
    return MaskedAutoencoderViT(decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8, mlp_ratio=4,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


@register_model
def MIM_vit_tiny_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=192, depth=12, num_heads=3, **kwargs)


@register_model
def MIM_vit_small_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=384, depth=12, num_heads=6, **kwargs)


@register_model
def MIM_vit_base_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


@register_model
def MIM_vit_large_patch16(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


@register_model
def MIM_vit_huge_patch14(pretrained=False, **kwargs):
    return _create(pretrained, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)
