"""Frozen features of a pretrained encoder, and the two scores SSL papers compute on them: k-NN (util/knn.py) and a
linear probe fitted on the stored features.

The encoder is the backbone export.py finds in any checkpoint (util/export/read.py), built as its timm model: a ViT
gives the mean of its patch tokens after the final norm (or the cls token), a CNN the spatial mean of its last feature
map. The linear probe is multinomial logistic regression on standardised features, fitted full-batch with L-BFGS:
it needs no batch size, learning rate or schedule, so it scores an encoder the same way on one CPU as on 64 GPUs
(MAE's LARS probe moves each weight by 0.001 x lr of its norm per step, with lr scaled by the batch: at batch 64
its head barely moves).
"""
import timm
import torch
import torch.nn.functional as F
from torch import nn

from util.export.read import read_backbone

PIXELS = 'pixels'


class PooledEncoder(nn.Module):
    """Images -> one feature vector per image. pool 'avg': the mean patch token (the spatial mean of a CNN's map);
    'token': a ViT's cls token; 'grid': the patch tokens (or the map) averaged over `grid` x `grid` cells and
    concatenated, cell-major per channel (grid^2 x width features; Goyal et al. 2019 score frozen CNN maps pooled
    so, keeping where a feature is, which a global mean discards)."""

    def __init__(self, model, family, pool='avg', grid=2):
        super().__init__()
        self.model, self.family, self.pool, self.grid = model, family, pool, grid

    def forward(self, images):
        features = self.model.forward_features(images)
        if self.family == 'vit':
            if self.pool == 'token':
                return features[:, 0]
            tokens = features[:, self.model.num_prefix_tokens:]
            if self.pool == 'avg':
                return tokens.mean(1)
            features = tokens.transpose(1, 2).unflatten(2, self.model.patch_embed.dynamic_feat_size(images.shape[2:]))
        if self.pool == 'grid':
            return F.adaptive_avg_pool2d(features, self.grid).flatten(1)
        return features.mean(dim=(2, 3))


class Pixels(nn.Module):
    """The baseline without an encoder: the (normalised) input pixels."""

    def forward(self, images):
        return images.flatten(1)


def build_frozen_encoder(checkpoint, pool='avg', random_init=False, seed=0, grid=2):
    """(encoder in eval mode, a line saying what it is). `checkpoint`: a file export.py reads, or 'pixels';
    `random_init`: the same architecture with timm's initial weights (seeded), the random-weight baseline."""
    if checkpoint == PIXELS:
        return Pixels().eval(), 'pixels (no encoder)'
    backbone = read_backbone(checkpoint)
    if backbone.family == 'r3d':
        raise ValueError(f'{checkpoint} holds a video trunk (R3D-18): score it with run_finetune_video.py '
                         f'--retrieval or --linear_eval, not on images')
    kwargs = dict(backbone.timm_kwargs)
    if backbone.family == 'vit':
        kwargs.pop('global_pool', None)
        kwargs['img_size'] = backbone.img_size
    torch.manual_seed(seed)
    model = timm.create_model(backbone.timm_name, num_classes=0, **kwargs)
    if not random_init:
        state = {k: v for k, v in backbone.state.items() if k in model.state_dict()}
        missing = [k for k in model.state_dict() if k not in state]
        if missing:
            raise ValueError(f'{checkpoint}: the encoder lacks {", ".join(missing[:3])}')
        model.load_state_dict(state)
    what = f'{backbone.what} as timm {backbone.timm_name}' + (', RANDOM weights (seed %d)' % seed
                                                               if random_init else '')
    return PooledEncoder(model, backbone.family, pool, grid).eval(), what


def fit_linear_probe(features, labels, num_classes, weight_decay=1e-4, max_iter=300):
    """(weight [C, D], bias [C], mean [D], std [D]), float64: logistic regression with L2 `weight_decay` on the
    weights (mean cross-entropy + weight_decay / 2 |W|^2) on the features standardised by their mean and std,
    fitted full-batch with L-BFGS."""
    mean, std = features.double().mean(0), features.double().std(0).clamp_min(1e-6)
    x = (features.double() - mean) / std
    linear = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, history_size=20,
                                  line_search_fn='strong_wolfe', tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels) + weight_decay / 2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear.weight.detach(), linear.bias.detach(), mean, std


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, weight_decay=1e-4,
                          max_iter=300):
    """Top-1 accuracy in percent on the test features of fit_linear_probe fitted on the training features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight, bias, mean, std = fit_linear_probe(train_features, train_labels, num_classes, weight_decay, max_iter)
    logits = ((test_features.double() - mean) / std) @ weight.T + bias
    return 100.0 * (logits.argmax(1) == test_labels).double().mean().item()


def choose_weight_decay(features, labels, candidates, held_out=0.1, seed=0):
    """(the candidate L2 weight whose probe, fitted on the rest, scores best on a random `held_out` fraction of the
    training features, {candidate: that held-out accuracy}). The test split is never looked at."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(labels) * held_out))
    val, fit = order[:cut], order[cut:]
    scores = {wd: linear_probe_accuracy(features[fit], labels[fit], features[val], labels[val], wd)
              for wd in candidates}
    return max(scores, key=lambda wd: (scores[wd], wd)), scores
