"""Throughput of SparK pretraining steps, and how much of the encoder's compute the masked dense convolutions
waste on masked positions.

SparK runs the CNN densely on the masked image and re-masks every output, so the encoder costs the same at
any mask ratio; a sparse (submanifold) convolution would compute only the visible positions (40% of the
FLOPs at mask 0.6). For one training step (forward + backward + LAMB step through the engine's TrainStep,
synthetic batch on the device) the bench reports:
  step       the whole SparK step, images/s
  encoder    forward + backward of the sparse encoder alone (what a sparse kernel would speed up)
  ideal      forward + backward of the dense CNN on a compact image of only the visible patches: the best
             case for a sparse kernel with no gather/scatter overhead
and the FLOPs of the encoder on the full image vs on the visible positions only.

    python bench/bench_spark.py --model resnet50 --batch_size 8 --threads 2            # CPU
    python bench/bench_spark.py --model resnet50 --batch_size 128 --amp bf16 --channels_last   # GPU
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import report  # noqa: E402  (bench/report.py, next to this script)

import timm  # noqa: E402
from timm.optim import Lamb  # noqa: E402
import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from models.spark import build_spark  # noqa: E402
from models.spark_sparse import hierarchical_forward  # noqa: E402
from util.spark_sched import spark_param_groups  # noqa: E402
from util.train_step import TrainStep  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='resnet50')
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask', type=float, default=0.6)
    p.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default='none')
    p.add_argument('--channels_last', action='store_true')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--json', default=None, help='append the result to this file as one JSON line')
    return p.parse_args()


def timed(fn, warmup, steps, device):
    for _ in range(warmup):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def compact_shape(len_keep, ratio):
    """A near-square grid of at least len_keep patches, in pixels."""
    h = math.isqrt(len_keep)
    w = math.ceil(len_keep / h)
    return h * ratio, w * ratio


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_spark(args.model, args.input_size, args.mask).to(device, memory_format=fmt).train()
    optimizer = Lamb(spark_param_groups(model), lr=1e-4, betas=(0.9, 0.95), max_grad_norm=5.0)
    trainer = TrainStep(model, optimizer, device, amp=args.amp)
    B, size = args.batch_size, args.input_size
    imgs = torch.randn(B, 3, size, size, device=device).contiguous(memory_format=fmt)
    mask = model.mask(B, device)

    def step():
        with trainer.autocast():
            loss = model(imgs, active_b1ff=mask)
        trainer.backward(loss)
        trainer.step()

    def encoder_pass(cnn, x, active=None):
        def run():
            with trainer.autocast():
                feats = model.sparse_encoder(x, active) if active is not None else hierarchical_forward(cnn, x)
            sum(f.float().sum() for f in feats).backward()
            model.zero_grad(set_to_none=True)
        return run

    ratio = model.downsample_ratio
    ch, cw = compact_shape(model.len_keep, ratio)
    compact = torch.randn(B, 3, ch, cw, device=device).contiguous(memory_format=fmt)
    dense_cnn = timm.create_model(args.model, num_classes=0, global_pool='').to(device, memory_format=fmt).train()

    with flop_counter.FlopCounterMode(display=False) as full_count:
        encoder_pass(None, imgs, mask)()
    with flop_counter.FlopCounterMode(display=False) as step_count:
        step()
    result = {
        'model': args.model, 'device': str(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
        'threads': torch.get_num_threads(), 'batch_size': B, 'input_size': size, 'mask': args.mask,
        'amp': args.amp, 'channels_last': args.channels_last,
        'visible_fraction': model.len_keep / (model.fmap_h * model.fmap_w), 'compact_input': [ch, cw],
        'step_s': timed(step, args.warmup, args.steps, device),
        'encoder_s': timed(encoder_pass(None, imgs, mask), args.warmup, args.steps, device),
        'ideal_sparse_encoder_s': timed(encoder_pass(dense_cnn, compact), args.warmup, args.steps, device),
        'encoder_gflop_per_img': full_count.get_total_flops() / B / 1e9,
        'step_gflop_per_img': step_count.get_total_flops() / B / 1e9,
    }
    result['img_per_s'] = B / result['step_s']
    result['encoder_share_of_step'] = result['encoder_s'] / result['step_s']
    result['ideal_step_speedup'] = result['step_s'] / (result['step_s'] - result['encoder_s']
                                                       + result['ideal_sparse_encoder_s'])
    report(result, args.json)


if __name__ == '__main__':
    main()
