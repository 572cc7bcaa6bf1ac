"""Layers shared by several models."""
import torch
import torch.nn as nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] tensor, with the manual formula of the official
    LocalMIM and SLaK code (not timm's LayerNorm2d, which permutes to channels-last)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]
