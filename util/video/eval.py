"""Test-time parts of the downstream video protocols: view-averaged classification, per-video features, retrieval.

- Classification (linear evaluation, fine-tuning): every view of a video is classified, softmax per view, and the
  probabilities are averaged over the video's views (eztorch's "same_avg"); top-1 / top-5 are those of the average.
- Retrieval: the pooled trunk features of a video's views are averaged (no softmax, no normalisation before);
  each set is centred on its own mean and L2-normalised, and a query counts as found at k when one of its k most
  cosine-similar bank videos has its label.
Clips arrive as 0..255 values; `normalize_clips` does the evaluation transform (/255, mean 0.45, std 0.225).
"""
import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from util.checkpoint import atomic_save
from util.data.samplers import is_sharded
from util.dist import all_reduce_sum, get_world_size, is_main_process
from util.metric_logger import MetricLogger

MEAN, STD = 0.45, 0.225
RECALL_KS = (1, 5, 10, 15, 20, 25)


def normalize_clips(clips, mean=MEAN, std=STD):
    """float32 (clips / 255 - mean) / std, computed with autocast off."""
    with torch.autocast(clips.device.type, enabled=False):
        return (clips.float() / 255 - mean) / std


def average_view_probabilities(logits, views_per_video):
    """[b * V, C] logits of consecutive views of b videos -> [b, C] softmax probabilities averaged per video."""
    probs = logits.float().softmax(-1)
    return probs.view(-1, views_per_video, probs.shape[-1]).mean(1)


class ViewAveragedClassifier(nn.Module):
    """`model` applied to every view of [b, V, 3, T, H, W] videos (0..255); returns the log of the view-averaged
    probabilities, so engine_finetune.evaluate's accuracies are those of the averaged probabilities and its loss
    is their negative log-likelihood."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, videos):
        logits = self.model(normalize_clips(videos.flatten(0, 1)))
        probs = average_view_probabilities(logits, videos.shape[1])
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


@torch.no_grad()
def extract_features(loader, trunk, device, num_videos, print_freq=50):
    """Per-video trunk features averaged over the views, from a loader of (views [b, V, ...], labels, indices).
    Returns (features [num_videos, D] float32, counts [num_videos]) on the CPU; counts say how often each video
    was extracted over all ranks (1, or 0 when it could not be read). Sharded loaders are summed over ranks."""
    was_training = trunk.training
    trunk.eval()
    features = torch.zeros(num_videos, trunk.num_features, dtype=torch.float64, device=device)
    counts = torch.zeros(num_videos, dtype=torch.float64, device=device)
    sharded = is_sharded(loader)
    meter = MetricLogger(len(loader), print_freq, 'Features:',
                         images_per_step=loader.batch_size * (get_world_size() if sharded else 1))
    try:
        for batch in meter.log_every(loader):
            if batch is None:  # no video of the batch could be read
                continue
            views, _, index = batch
            b, v = views.shape[:2]
            h = trunk(normalize_clips(views.to(device, non_blocking=True).flatten(0, 1)))
            index = index.to(device)
            features.index_add_(0, index, h.double().view(b, v, -1).mean(1))
            counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    finally:
        trunk.train(was_training)
    if sharded:
        all_reduce_sum(features)
        all_reduce_sum(counts)
    return features.float().cpu(), counts.cpu()


def retrieval_recall(queries, query_labels, bank, bank_labels, ks=RECALL_KS):
    """{k: R@k in percent}: the share of queries with a bank item of their label among their k nearest (cosine
    similarity after centring each set on its own mean). Equal similarities rank in bank order."""
    q = F.normalize(queries.double() - queries.double().mean(0), dim=1)
    b = F.normalize(bank.double() - bank.double().mean(0), dim=1)
    kmax = min(max(ks), len(bank))
    order = torch.sort(q @ b.T, dim=1, descending=True, stable=True).indices[:, :kmax]
    found = (bank_labels[order] == query_labels[:, None]).cumsum(1) > 0  # [Q, kmax]: found within the first j
    return {k: 100 * found[:, min(k, kmax) - 1].double().mean().item() for k in ks}


def broadcast_buffers(model):
    """Every rank takes rank 0's buffers (BatchNorm statistics drift apart without SyncBatchNorm), so a sharded
    evaluation is that of the saved model."""
    if get_world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def file_identity(path):
    """(path, size, mtime) of a file, or None: changes when a checkpoint is rewritten."""
    if not path:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def list_digest(items):
    return hashlib.sha1('\n'.join(f'{p} {label}' for p, label, _ in items).encode()).hexdigest()


def cached_features(path, key, compute):
    """{'features', 'labels', 'counts', 'key'} from `path` when it was saved with the same `key` (a dict of plain
    values naming the checkpoint, videos and views), else `compute()`'s, saved there (main process) for next time.
    Call on every rank: `compute` may be a collective."""
    if path and os.path.isfile(path):
        cached = torch.load(path, map_location='cpu', weights_only=True)
        if cached.get('key') == key:
            print(f'features from {path}')
            return cached
    result = {**compute(), 'key': key}
    if path and is_main_process():
        atomic_save(result, path)
    return result
