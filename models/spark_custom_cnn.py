"""Pretraining your own CNN with SparK: the template the SparK README describes, made runnable.

A CNN is SparK-ready when it has the three methods `SparseEncoder` calls: `get_downsample_ratio()` (the
total stride, also SparK's mask patch size), `get_feature_map_channels()` and `forward(x, hierarchical=True)`
returning the feature maps largest first, each an integer multiple of the smallest in size (with
hierarchical=False it returns whatever fine-tuning needs, e.g. logits).

Every parameter must take part in the hierarchical forward (DDP runs without find_unused_parameters), so
with num_classes=0 hold no classifier. Register a factory with `@register_model` (pretraining defaults go to
`SPARK_DEFAULT_KWARGS` in models/spark.py) and `python main_spark.py --model=your_convnet` works. Use layers
SparK can make sparse (models/spark_sparse.py: convolutions, batch and layer norms, pooling, pointwise ops);
global pooling, SE blocks and GroupNorm mix masked positions into visible ones (SparK issues #54, #56).
"""
import torch.nn as nn
from timm.models import register_model


def conv_bn_act(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class YourConvNet(nn.Module):
    """A small plain ConvNet: a stem, then one stage per width, each two conv-BN-ReLU. The stem has stride 4 (conv +
    max pool; the stages then have strides 1, 2, 2, 2: downsample ratio 32) or 1 (stages of stride 2 throughout).
    SparK's decoder has one block per halving of the resolution, and each feature map must reach one, so the
    stride-1 stem's full-resolution output is not a feature map."""

    def __init__(self, num_classes=1000, widths=(32, 64, 128, 256), in_chans=3, stem_stride=4, **kwargs):
        # kwargs: what timm.create_model and SparK pass along (global_pool, drop_path_rate, pretrained_cfg,
        # ...); this example has no use for them
        super().__init__()
        if stem_stride not in (1, 4):
            raise ValueError(f'stem_stride must be 4 (conv + max pool) or 1 (conv), got {stem_stride}')
        self.widths = list(widths)
        self.stem = nn.Sequential(conv_bn_act(in_chans, widths[0], 2), nn.MaxPool2d(3, 2, 1)) if stem_stride == 4 \
            else conv_bn_act(in_chans, widths[0], 1)
        strides = [1 if stem_stride == 4 else 2] + [2] * (len(widths) - 1)
        self.downsample_ratio = stem_stride * 2 ** sum(s == 2 for s in strides)
        cins = [widths[0]] + self.widths[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_act(cin, cout, stride), conv_bn_act(cout, cout, 1))
            for cin, cout, stride in zip(cins, self.widths, strides))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def get_downsample_ratio(self) -> int:
        return self.downsample_ratio

    def get_feature_map_channels(self) -> list:
        return list(self.widths)

    def forward(self, x, hierarchical=False):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if hierarchical:
            return features
        return self.forward_head(x)

    # what run_finetune.py and eval_knn.py use of a timm classifier
    def forward_features(self, x):
        return self(x, hierarchical=True)[-1]

    def forward_head(self, x, pre_logits=False):
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def group_matcher(self, coarse=False):
        return {'stem': r'^stem', 'blocks': r'^stages\.(\d+)'}


@register_model
def your_convnet(pretrained=False, **kwargs):
    return YourConvNet(**kwargs)


@register_model
def your_convnet_32px(pretrained=False, **kwargs):
    """For 32-px images (CIFAR, Fashion-MNIST): a stride-1 stem and three stages (downsample ratio 8), so SparK masks
    a 4x4 grid of 8-px patches (a stride-32 network would see one patch)."""
    return YourConvNet(**{'widths': (32, 64, 128), 'stem_stride': 1, **kwargs})
