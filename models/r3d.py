"""R3D-18 video trunk of SCE: eztorch's `create_resnet3d_basic(model_depth=18)` plus the
parameter-free global-pool head.

It is neither torchvision's r3d_18 (3x3x3 convs everywhere, 3x7x7 stem) nor pytorchvideo's `create_resnet`
(bottlenecks): the stem is a 1x7x7 conv, stages 1-2 use 1x3x3 convs and stages 3-4 a 3x3x3 `conv_a`, and the
time axis is never strided, so [B, 3, 8, 224, 224] -> [B, 512, 8, 7, 7] -> h in R^512. Module names follow
pytorchvideo (`model.blocks.1.res_blocks.0.branch2.conv_a.weight`, `...branch1_conv`, `...branch1_norm`), so
state dicts match the official checkpoints key for key. Initialisation is pytorchvideo's "resnet" one:
kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, except the last BN of every basic block
(`branch2.norm_b`), whose weight starts at 0 so every residual block starts as the identity.
"""
import torch
from torch import nn

from models.grad_ckpt import checkpointed

STAGE_DEPTHS = {18: (2, 2, 2, 2)}


class Stem(nn.Module):
    """Conv 1x7x7 /(1,2,2) -> BN -> ReLU -> MaxPool 1x3x3 /(1,2,2)."""

    def __init__(self, in_channels=3, out_channels=64):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False)
        self.norm = nn.BatchNorm3d(out_channels)
        self.activation = nn.ReLU()
        self.pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))

    def forward(self, x):
        return self.pool(self.activation(self.norm(self.conv(x))))


class BasicBlock(nn.Module):
    """Branch 2 of a residual block: conv_a -> norm_a -> act_a -> conv_b (1x3x3) -> norm_b."""

    def __init__(self, dim_in, dim_out, temporal_kernel, stride):
        super().__init__()
        t = temporal_kernel
        self.conv_a = nn.Conv3d(dim_in, dim_out, (t, 3, 3), stride, (t // 2, 1, 1), bias=False)
        self.norm_a = nn.BatchNorm3d(dim_out)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv3d(dim_out, dim_out, (1, 3, 3), 1, (0, 1, 1), bias=False)
        self.norm_b = nn.BatchNorm3d(dim_out)
        self.norm_b.block_final_bn = True  # zero-initialised (see `init_resnet_weights`)

    def forward(self, x):
        return self.norm_b(self.conv_b(self.act_a(self.norm_a(self.conv_a(x)))))


class ResBlock(nn.Module):
    """ReLU(shortcut(x) + branch2(x)); the shortcut is a strided 1x1x1 conv + BN where the shape changes."""

    def __init__(self, dim_in, dim_out, temporal_kernel, stride):
        super().__init__()
        project = dim_in != dim_out or stride != (1, 1, 1)
        self.branch1_conv = nn.Conv3d(dim_in, dim_out, 1, stride, bias=False) if project else None
        self.branch1_norm = nn.BatchNorm3d(dim_out) if project else None
        self.branch2 = BasicBlock(dim_in, dim_out, temporal_kernel, stride)
        self.activation = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self, depth, dim_in, dim_out, temporal_kernel, spatial_stride):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(dim_in if i == 0 else dim_out, dim_out, temporal_kernel,
                     (1, spatial_stride, spatial_stride) if i == 0 else (1, 1, 1))
            for i in range(depth))

    def forward(self, x):
        for block in self.res_blocks:
            x = block(x)
        return x


class Net(nn.Module):
    """pytorchvideo's `Net`: the blocks in sequence (stem, then four stages). With `grad_checkpointing` the
    stem and every residual block are checkpointed segments (models/grad_ckpt.py)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def segments(self):
        for block in self.blocks:
            yield from block.res_blocks if isinstance(block, ResStage) else [block]

    def forward(self, x):
        if not self.grad_checkpointing:
            for block in self.blocks:
                x = block(x)
            return x
        for segment in self.segments():
            x = checkpointed(segment, x)
        return x


class GlobalPoolHead(nn.Module):
    """The SCE trunk head: pool=None, no dropout, no projection, so only AdaptiveAvgPool3d(1) + flatten."""

    def __init__(self):
        super().__init__()
        self.output_pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x):
        return self.output_pool(x).flatten(1)


class VideoHeadModel(nn.Module):
    """`.model` (the conv net, [B, C, T, H, W] -> feature map) followed by `.head` (-> [B, num_features])."""

    def __init__(self, model, head, num_features):
        super().__init__()
        self.model, self.head, self.num_features = model, head, num_features

    def set_grad_checkpointing(self, enable=True):
        """Recompute the conv net's activations in the backward pass: less memory for about a third more
        compute; BatchNorm running statistics are updated once, as without it."""
        self.model.grad_checkpointing = enable

    def forward_features(self, x):
        return self.model(x)

    def forward(self, x):
        return self.head(self.model(x))


def init_resnet_weights(module, fc_init_std=0.01):
    """pytorchvideo's `init_net_weights(style='resnet')` with zero_init_final_bn=True."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            if m.weight is not None:
                nn.init.constant_(m.weight, 0.0 if getattr(m, 'block_final_bn', False) else 1.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=fc_init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def resnet3d_basic(depth=18, in_channels=3, stem_dim=64):
    """The conv net of `create_resnet3d_basic(model_depth=depth, head=None)`: widths 64-128-256-512, spatial
    strides 1-2-2-2, conv_a temporal kernels 1-1-3-3."""
    if depth not in STAGE_DEPTHS:
        raise ValueError(f'R3D depth {depth} is not supported (choose from {sorted(STAGE_DEPTHS)})')
    blocks, dim_in = [Stem(in_channels, stem_dim)], stem_dim
    for i, (n, t, s) in enumerate(zip(STAGE_DEPTHS[depth], (1, 1, 3, 3), (1, 2, 2, 2))):
        dim_out = stem_dim * 2 ** i
        blocks.append(ResStage(n, dim_in, dim_out, t, s))
        dim_in = dim_out
    net = Net(blocks)
    init_resnet_weights(net)
    return net, dim_in


def r3d18_trunk(in_channels=3):
    """The SCE trunk: R3D-18 + global average pool, clip [B, 3, T, H, W] -> h [B, 512]."""
    net, dim = resnet3d_basic(18, in_channels)
    return VideoHeadModel(net, GlobalPoolHead(), dim)


class VideoClassifier(nn.Module):
    """A pooled trunk (`r3d18_trunk()`) -> Dropout -> Linear: eztorch's fine-tuning and linear-evaluation head
    (weights N(0, 0.01), bias 0). With `freeze_trunk` the trunk has no gradients, runs under no_grad and stays in
    eval mode whatever `train()` says, so its BatchNorm uses, and never updates, the pretrained statistics."""

    def __init__(self, trunk, num_classes, dropout=0.0, freeze_trunk=False):
        super().__init__()
        self.trunk, self.freeze_trunk = trunk, freeze_trunk
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(trunk.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if freeze_trunk:
            trunk.requires_grad_(False)
            trunk.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_trunk:
            self.trunk.eval()
        return self

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_trunk):
            h = self.trunk(x)
        return self.fc(self.dropout(h))


if __name__ == '__main__':
    trunk = r3d18_trunk()
    print(sum(p.numel() for p in trunk.parameters()), trunk(torch.randn(1, 3, 8, 64, 64)).shape)
