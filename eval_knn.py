"""k-NN accuracy (and a linear probe) of any pretrained image encoder on frozen features, as DINO's eval_knn.py.

    python eval_knn.py output_dir/checkpoint-last.pth --data_path fashion-mnist --input_size 64
    python eval_knn.py output_dir/checkpoint-last.pth --random_init ...   # the same network at random weights
    python eval_knn.py pixels --data_path fashion-mnist --input_size 64    # the raw-pixel baseline
    python eval_knn.py ... --linear --pool grid --grid 2    # tokens averaged over a 2x2 grid, not over the image

The checkpoint is anything export.py reads (LocalMIM / FreezeOut / MAE, SparK, SLaK, fine-tuned or official).
Both splits go through the evaluation transform (resize, centre crop at --crop_pct, normalisation).
"""
import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from util.cli import add_run_flags, check_flags
from util.data.bad_files import collate_readable
from util.data.datasets import (add_finetune_data_args, build_eval_transform, build_finetune_dataset,
                                check_finetune_data_args)
from util.export.frozen_eval import build_frozen_encoder, choose_weight_decay, linear_probe_accuracy
from util.knn import extract_features, knn_accuracy, random_subset
from util.runtime import run_cli


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint', help="a checkpoint export.py reads, or 'pixels' (the input pixels as features)")
    add_finetune_data_args(p, default_data_path='demo')
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--crop_pct', default=1.0, type=float, help='centre crop of the resized image (1: no crop)')
    p.add_argument('--pool', default='avg', choices=['avg', 'token', 'grid'],
                   help='features: the mean patch token after the final norm (a CNN: the mean of its last map), a '
                        "ViT's cls token, or the tokens (map) averaged over --grid x --grid cells, concatenated")
    p.add_argument('--grid', default=2, type=int, metavar='N', help='--pool grid: cells per side')
    p.add_argument('--nb_knn', default=[20], type=int, nargs='+', help='k values (DINO: 10 20 100 200)')
    p.add_argument('--temperature', default=0.07, type=float, help='weight of a neighbour: exp(similarity / T)')
    p.add_argument('--linear', action='store_true', help='also fit a linear probe on the frozen features')
    p.add_argument('--linear_wd', default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0], type=float, nargs='+',
                   help='L2 weight of the linear probe; several: the best on 10%% of the training images held out')
    p.add_argument('--random_init', action='store_true', help="the checkpoint's architecture at timm's initial "
                                                              'weights (the random-weight baseline)')
    p.add_argument('--train_subset', default=0, type=int, metavar='N',
                   help='use N training images drawn at random (--seed) as the neighbours; 0: all')
    p.add_argument('--batch_size', default=256, type=int)
    p.add_argument('--num_workers', default=2, type=int)
    add_run_flags(p, device='cuda' if torch.cuda.is_available() else 'cpu', pin_mem=None, max_nonfinite=False,
                  save_every_steps=False)
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results to FILE as JSON')
    return p


def frozen_features(args, encoder, is_train):
    dataset = build_finetune_dataset(is_train, args, transform=build_eval_transform(args.input_size, args.crop_pct))
    if is_train:
        dataset = random_subset(dataset, args.train_subset, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=None if is_train else collate_readable)
    return extract_features(encoder, (batch for batch in loader if batch is not None), args.device)


def main(args):
    check_flags(args, {'--input_size': '>= 1', '--crop_pct': '(0, 1]', '--nb_knn': '>= 1', '--temperature': '> 0',
                       '--linear_wd': '>= 0', '--grid': '>= 1', '--train_subset': '>= 0', '--batch_size': '>= 1',
                       '--num_workers': '>= 0'})
    check_finetune_data_args(args)
    args.nb_classes = float('inf')  # the class list comes from the data
    encoder, what = build_frozen_encoder(args.checkpoint, args.pool, args.random_init, args.seed, args.grid)
    print(f'encoder: {what}')
    encoder.to(args.device)
    start = time.time()
    train_features, train_labels = frozen_features(args, encoder, True)
    test_features, test_labels = frozen_features(args, encoder, False)
    print(f'features: {tuple(train_features.shape)} train, {tuple(test_features.shape)} val '
          f'in {time.time() - start:.0f} s')
    results = {'encoder': what, 'feature_dim': train_features.shape[1], 'train_images': len(train_labels),
               'val_images': len(test_labels)}
    for k in args.nb_knn:
        results[f'knn_top1_k{k}'] = knn_accuracy(train_features, train_labels, test_features, test_labels, k,
                                                 args.temperature)
        print(f'{k}-NN (T={args.temperature}): top-1 {results[f"knn_top1_k{k}"]:.2f}%')
    if args.linear:
        wd = args.linear_wd[0]
        if len(args.linear_wd) > 1:
            wd, held_out = choose_weight_decay(train_features, train_labels, args.linear_wd, seed=args.seed)
            print('linear probe L2 weight, held-out top-1: ' + ', '.join(f'{w:g}: {a:.2f}%' for w, a in
                                                                         held_out.items()))
        results['linear_top1'] = linear_probe_accuracy(train_features, train_labels, test_features, test_labels, wd)
        results['linear_wd'] = wd
        print(f'linear probe (logistic regression, L2 {wd:g}): top-1 {results["linear_top1"]:.2f}%')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    run_cli(main, get_args_parser())
