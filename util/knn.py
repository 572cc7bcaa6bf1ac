"""Weighted k-NN classification on frozen features, as DINO's eval_knn.py scores a self-supervised encoder.

Features are L2-normalised; each test sample takes the k training samples of highest cosine similarity, and each
of them votes for its class with weight exp(similarity / T). With T -> 0 this is a majority vote of the nearest
neighbour only; with the default T = 0.07 (DINO's) close neighbours count more than far ones.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from util.data.bad_files import collate_readable
from util.data.datasets import ImageFolderOrFlat, build_eval_transform, resolve_image_root


@torch.no_grad()
def extract_features(encode, loader, device):
    """(features [N, D] float32 on the CPU, labels [N]) of `encode(images)` over the loader's batches."""
    features, labels = [], []
    for images, targets in loader:
        features.append(encode(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk=1024):
    """Predicted classes [M] of the test features by similarity-weighted votes of their k nearest training
    features (cosine similarity)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f'k-NN: k must be >= 1 and the temperature > 0, got k={k}, T={temperature}')
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start:start + chunk].float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes).scatter_add_(1, train_labels[index],
                                                                  (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07):
    """Top-1 accuracy in percent of knn_predict."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (predicted == test_labels).float().mean().item()


def random_subset(dataset, size, seed):
    """`size` samples of `dataset` drawn with `seed`, in their original order (the whole set for size 0 or for a
    size not below its length)."""
    if not 0 < size < len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, chosen.sort().values.tolist())


class KnnMonitor:
    """k-NN accuracy of a model's frozen features on a labelled data set, every `every` epochs of a pretraining run
    (as solo-learn's online k-NN): the neighbours are `train_images` images of `data_path`'s train/ (drawn once with
    `seed`; 0: all), scored on its val/. It runs on the main process only; the others wait at their next
    collective."""

    def __init__(self, data_path, input_size, every, k=20, train_images=10000, batch_size=256, num_workers=2,
                 seed=0):
        self.every, self.k, self.batch_size, self.num_workers = every, k, batch_size, num_workers
        transform = build_eval_transform(input_size, crop_pct=1.0)
        roots = [resolve_image_root(data_path, split) for split in ('train', 'val')]
        if roots[1].name != 'val':
            raise FileNotFoundError(f'--knn_every: --data_path {data_path} has no val/ class folders to score '
                                    f'k-NN on (it needs train/ and val/)')
        self.train, self.val = (ImageFolderOrFlat(root, transform, drop_unreadable=True) for root in roots)
        self.train = random_subset(self.train, train_images, seed)

    def due(self, epoch, last):
        return self.every > 0 and ((epoch + 1) % self.every == 0 or last)

    def __call__(self, encode, device):
        """Top-1 k-NN accuracy (%) of `encode` (run in no_grad)."""
        loaders = [DataLoader(data, self.batch_size, num_workers=self.num_workers,
                                               collate_fn=collate_readable) for data in (self.train, self.val)]
        (train_x, train_y), (val_x, val_y) = (extract_features(encode, (b for b in loader if b is not None), device)
                                              for loader in loaders)
        return knn_accuracy(train_x, train_y, val_x, val_y, self.k)
