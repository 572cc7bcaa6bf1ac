"""SparK's layer-wise lr decay for fine-tuning its encoders: the depth of each parameter of a timm ResNet or ConvNeXt
(https://github.com/keyu-tian/SparK/blob/main/downstream_imagenet/models/__init__.py)."""
import functools
import math

from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet

from util.classification import timm_convnext_layer_id

# SparK's ResNet depths (https://github.com/keyu-tian/SparK/blob/main/downstream_imagenet/models/__init__.py):
# blocks of layer2 and of layer3 per depth, by the number of blocks in layer2 and layer3
SPARK_RESNET_BLOCKS_PER_DEPTH = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4), (30, 48): (5, 6)}


def spark_resnet_layer_id(name, layer2_blocks, layer3_blocks):
    """SparK's layer-decay depth of a timm ResNet parameter: stem 0, layer1 1, layer2 and layer3 in runs of a few
    blocks, layer4 N, fc N + 1 (ResNet-50: stem 0, layer1 1, layer2 2-3, layer3 4-5, layer4 6, fc 7).
    Defined for the depths in SPARK_RESNET_BLOCKS_PER_DEPTH only (KeyError otherwise)."""
    per2, per3 = SPARK_RESNET_BLOCKS_PER_DEPTH[layer2_blocks, layer3_blocks]
    depths2, depths3 = math.ceil(layer2_blocks / per2), math.ceil(layer3_blocks / per3)
    last = 2 + depths2 + depths3
    parts = name.split('.')
    if parts[0] == 'fc':
        return last + 1
    stage = {'layer1': 1, 'layer2': 2, 'layer3': 3, 'layer4': 4}.get(parts[0])
    if stage is None:
        return 0
    block = int(parts[1])
    return {1: 1, 2: 2 + block // per2, 3: 2 + depths2 + block // per3, 4: last}[stage]



def spark_layer_depths(model):
    """(layer_id, N) of SparK's fine-tuning layer decay (lr scale decay^(N + 1 - depth)) for timm ResNets of the
    depths SparK fine-tunes and for timm ConvNeXts (N = 12 when the third stage has more than 9 blocks, else 6), or None
    (https://github.com/keyu-tian/SparK/blob/main/downstream_imagenet/models/__init__.py)."""
    if isinstance(model, ResNet) and (len(model.layer2), len(model.layer3)) in SPARK_RESNET_BLOCKS_PER_DEPTH:
        layer_id = functools.partial(spark_resnet_layer_id, layer2_blocks=len(model.layer2),
                                     layer3_blocks=len(model.layer3))
        return layer_id, layer_id('fc.weight') - 1
    if isinstance(model, ConvNeXt):
        num_layers = 12 if len(model.stages[-2].blocks) > 9 else 6
        return functools.partial(timm_convnext_layer_id, num_layers=num_layers), num_layers
    return None
