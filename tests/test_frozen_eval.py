"""Scoring frozen features: the k-NN monitor of run_pretrain.py, eval_knn.py (k-NN, linear probe, random-weight and
pixel baselines), and the learning check: a short LocalMIM run on Fashion-MNIST beats its own random weights."""
import argparse
import copy
import json
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch.utils.data import DataLoader, Subset

import eval_knn
import run_pretrain
from helpers import log_entries, pretrain_args, write_images
from test_fashion_mnist import needs_package
from models.localmim import MaskedAutoencoderViT
from models.spark import build_spark
from util.data.datasets import ImageFolderOrFlat, build_eval_transform, build_pretrain_dataset, resolve_image_root
from util.data.fashion_mnist import train_subset
from util.export.frozen_eval import PooledEncoder, build_frozen_encoder, fit_linear_probe, linear_probe_accuracy
from util.knn import KnnMonitor, extract_features, knn_accuracy
from util.spark.checkpoint import output_names, save_spark_outputs


@pytest.fixture(scope='module')
def monitored_run(tmp_path_factory):
    """One epoch of LocalMIM on the demo data with the k-NN monitor on, every training image a neighbour."""
    out = tmp_path_factory.mktemp('knn_monitor')
    run_pretrain.main(pretrain_args('demo', out, '--epochs', '1', '--warmup_epochs', '0', '--knn_every', '1',
                                    '--knn_train_images', '0', '--knn_k', '5'))
    return out


def knn_args(checkpoint, *extra):
    return eval_knn.get_args_parser().parse_args([str(checkpoint), '--data_path', 'demo', '--input_size', '32',
                                                   '--num_workers', '0', '--batch_size', '16', *extra])


def test_monitor_scores_what_the_exported_encoder_scores(monitored_run):
    logged = [entry['train_knn_top1'] for entry in log_entries(monitored_run)]
    results = eval_knn.main(knn_args(monitored_run / 'checkpoint-last.pth', '--nb_knn', '5'))
    assert len(logged) == 1 and logged[0] == pytest.approx(results['knn_top1_k5'], abs=1e-9)
    assert results['train_images'] == 144 and results['val_images'] == 36  # demo: 6 classes x (24, 6)


def test_pooled_features_are_the_timm_vit_mean_patch_token(monitored_run):
    ckpt = torch.load(monitored_run / 'checkpoint-last.pth', weights_only=True)
    model = run_pretrain.build_model(pretrain_args('demo', monitored_run))
    model.load_state_dict(ckpt['model'])
    encoder, what = build_frozen_encoder(str(monitored_run / 'checkpoint-last.pth'))
    images = torch.randn(3, 3, 32, 32)
    tokens = encoder.model.forward_features(images)
    torch.testing.assert_close(model.eval().pooled_features(images), tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder(images), tokens[:, 1:].mean(1))
    assert 'LocalMIM pretraining' in what and 'vit_tiny_patch16_224' in what


def test_grid_pool_concatenates_the_mean_token_of_each_cell():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = vit.forward_features(images)[:, 1:].unflatten(1, (4, 4))  # [B, row, column, D]
    quadrants = torch.stack([tokens[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for i in (0, 1) for j in (0, 1)],
                            dim=2)  # [B, D, cell]
    torch.testing.assert_close(PooledEncoder(vit, 'vit', 'grid', 2)(images), quadrants.flatten(1))
    torch.testing.assert_close(PooledEncoder(vit, 'vit', 'grid', 1)(images), PooledEncoder(vit, 'vit')(images))
    cnn = timm.create_model('resnet18', num_classes=0).eval()
    feature_map = cnn.forward_features(images)  # [B, 512, 2, 2]
    torch.testing.assert_close(PooledEncoder(cnn, 'cnn', 'grid', 2)(images), feature_map.flatten(1))


def test_random_init_is_the_same_network_at_other_weights(monitored_run):
    path = str(monitored_run / 'checkpoint-last.pth')
    trained, _ = build_frozen_encoder(path)
    random_a, what = build_frozen_encoder(path, random_init=True, seed=1)
    random_b, _ = build_frozen_encoder(path, random_init=True, seed=1)
    assert 'RANDOM weights' in what
    assert trained.model.state_dict().keys() == random_a.model.state_dict().keys()
    assert not torch.equal(trained.model.blocks[0].attn.qkv.weight, random_a.model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(random_a.model.state_dict(), random_b.model.state_dict())


def test_pixels_baseline_is_knn_on_the_flattened_images(tmp_path):
    results = eval_knn.main(knn_args('pixels', '--nb_knn', '1', '3', '--json', str(tmp_path / 'r.json')))
    transform = build_eval_transform(32, 1.0)
    splits = [ImageFolderOrFlat(resolve_image_root('demo', s), transform) for s in ('train', 'val')]
    (train_x, train_y), (val_x, val_y) = (
        (torch.stack([data[i][0].flatten() for i in range(len(data))]), torch.tensor([y for _, y in data.samples]))
        for data in splits)
    similarity = F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T
    nearest = train_y[similarity.argmax(1)]  # k=1: the single nearest neighbour's class
    assert results['knn_top1_k1'] == pytest.approx(100 * (nearest == val_y).float().mean().item())
    assert json.loads((tmp_path / 'r.json').read_text())['knn_top1_k3'] == results['knn_top1_k3']


def test_linear_probe_is_l2_logistic_regression_on_standardised_features():
    """Against the same objective written in numpy and minimised by scipy's L-BFGS-B."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    features = rng.normal(size=(4, 6))[labels] * 1.5 + rng.normal(size=(300, 6)) * 2
    train, test, wd, classes = slice(0, 200), slice(200, 300), 0.01, 4
    mean, std = features[train].mean(0), features[train].std(0, ddof=1)
    x, y = (features[train] - mean) / std, labels[train]

    def objective(flat):  # mean cross-entropy + wd/2 |W|^2 (the bias is not decayed), and its gradient
        w, b = flat[:6 * classes].reshape(classes, 6), flat[6 * classes:]
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).mean() + wd / 2 * (w ** 2).sum()
        p[np.arange(len(y)), y] -= 1
        return loss, np.concatenate([(p.T @ x / len(y) + wd * w).ravel(), p.mean(0)])

    flat = minimize(objective, np.zeros(7 * classes), jac=True, method='L-BFGS-B', tol=1e-12).x
    w, b = flat[:6 * classes].reshape(classes, 6), flat[6 * classes:]
    expected = 100 * (((features[test] - mean) / std @ w.T + b).argmax(1) == labels[test]).mean()
    weight, bias, _, _ = fit_linear_probe(torch.tensor(features[train]), torch.tensor(y), classes, wd)
    np.testing.assert_allclose(weight.numpy(), w, atol=1e-5)
    np.testing.assert_allclose(bias.numpy() - bias.numpy().mean(), b - b.mean(), atol=1e-5)  # softmax: up to a shift
    ours = linear_probe_accuracy(torch.tensor(features[train]), torch.tensor(labels[train]),
                                 torch.tensor(features[test]), torch.tensor(labels[test]), weight_decay=wd)
    assert ours == pytest.approx(expected)
    assert 40 < ours < 100  # learnable, far from chance (25%), not trivial


def test_bad_monitor_flags_and_a_folder_without_val_split(tmp_path):
    with pytest.raises(ValueError, match='--knn_every -1: must be >= 0'):
        run_pretrain.check_args(pretrain_args('demo', tmp_path / 'o', '--knn_every', '-1'))
    for name in ('a', 'b'):
        write_images(tmp_path / 'only_classes' / name, 2)
    with pytest.raises(FileNotFoundError, match='no val/ class folders'):
        KnnMonitor(tmp_path / 'only_classes', 32, every=1)


@needs_package
def test_learning_check_localmim_beats_its_own_random_weights_on_fashion_mnist():
    """About a minute: a 4-block LocalMIM ViT (patch 4 at 32 px) pretrained for 6 epochs on 1,000 Fashion-MNIST
    images gains more than 3 points of 20-NN accuracy over its own initial weights (measured: 47.3% -> 53.3%). A
    loss, target, mask or augmentation that stops the encoder learning leaves it near the initial score."""
    torch.manual_seed(0)
    root = train_subset(100)
    model = MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64,
                                 decoder_num_heads=4)
    initial = copy.deepcopy(model)
    loader = DataLoader(build_pretrain_dataset(root, 32), batch_size=64, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(6):
        for images, _ in loader:
            loss, _ = model(images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    transform = build_eval_transform(32, 1.0)
    train = ImageFolderOrFlat(root / 'train', transform)
    val = Subset(ImageFolderOrFlat(root / 'val', transform), range(0, 10000, 10))  # 100 per class
    scores = {}
    for name, encoder in (('pretrained', model), ('initial', initial)):
        encoder.eval()
        (train_x, train_y), (val_x, val_y) = (extract_features(encoder.pooled_features, DataLoader(d, 256), 'cpu')
                                              for d in (train, val))
        scores[name] = knn_accuracy(train_x, train_y, val_x, val_y, k=20)
    assert scores['pretrained'] > scores['initial'] + 3, scores


def test_a_spark_cnn_is_scored_on_its_pooled_encoder_features(tmp_path):
    spark = build_spark('resnet18', input_size=64)
    with torch.no_grad():
        for p in spark.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off its initial weights, so --random_init shows
    args = argparse.Namespace(model='resnet18', exp_dir=str(tmp_path), input_size=64)
    save_spark_outputs(args, 0, types.SimpleNamespace(num_updates=0, scaler=None), spark,
                       torch.optim.SGD(spark.parameters(), lr=0.1), {'min_loss': 1.0, 'last_loss': 1.0})
    encoder, what = build_frozen_encoder(str(tmp_path / output_names('resnet18')['resume']))
    reference = timm.create_model('resnet18', num_classes=0).eval()
    reference.load_state_dict({k.removeprefix('sparse_encoder.sp_cnn.'): v for k, v in spark.state_dict().items()
                               if k.startswith('sparse_encoder.sp_cnn.')})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference(images))  # timm's own global average pool
    assert 'SparK pretraining' in what and not encoder.training
