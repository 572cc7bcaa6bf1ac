"""Weighted k-NN classification on frozen features, as DINO's eval_knn.py scores a self-supervised encoder.

Features are L2-normalised; each test sample takes the k training samples of highest cosine similarity, and each
of them votes for its class with weight exp(similarity / T). With T -> 0 this is a majority vote of the nearest
neighbour only; with the default T = 0.07 (DINO's) close neighbours count more than far ones.
"""
import torch
import torch.nn.functional as F


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
