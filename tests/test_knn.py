"""util/knn.py: weighted k-NN against a loop written from the definition, and its edge cases."""
import numpy as np
import pytest
import torch

from util.knn import knn_accuracy, knn_predict


def reference(train, train_labels, test, num_classes, k, temperature):
    """For each test vector: cosine similarity to every training vector, the k largest, exp(s / T) votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = []
    for x in test:
        s = train @ (x / np.linalg.norm(x))
        nearest = np.argsort(-s)[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(s[i] / temperature)
        out.append(votes.argmax())
    return np.array(out)


@pytest.mark.parametrize('k,temperature', [(1, 0.07), (5, 0.07), (20, 0.5), (20, 10.0)])
def test_predictions_equal_the_definition(k, temperature):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))
    labels = rng.integers(0, 4, 200)
    got = knn_predict(torch.tensor(train), torch.tensor(labels), torch.tensor(test), 4, k, temperature, chunk=16)
    np.testing.assert_array_equal(got.numpy(), reference(train, labels, test, 4, k, temperature))


def test_scale_invariance_and_accuracy_on_separable_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 30)
    points = centres[labels] + rng.normal(size=(90, 16))
    train, test = torch.tensor(points[::2]), torch.tensor(points[1::2])
    train_labels, test_labels = torch.tensor(labels[::2]), torch.tensor(labels[1::2])
    assert knn_accuracy(train, train_labels, test, test_labels) == 100.0
    assert knn_accuracy(train * 7, train_labels, test * 0.1, test_labels) == 100.0  # cosine: scale-free
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(train, shuffled, test, test_labels) < 70.0


def test_bad_k_is_one_clear_line():
    with pytest.raises(ValueError, match='k must be >= 1'):
        knn_predict(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(1, 2), 2, k=0)
