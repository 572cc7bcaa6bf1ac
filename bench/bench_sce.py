"""Throughput of SCE video pretraining: the training step on the device, and the CPU data pipeline separately.

  step   one full SCE training step of main_sce.py on a synthetic uint8 batch already on the device: both GPU
         augmentation pipelines, target forward of both views, online forward of both views, loss, backward,
         LARS step and the SCEHook (enqueue + EMA), through the engine's TrainStep. Reported as videos/s (one
         video = one pair of clips, the engine's progress-line unit) and clips/s (2 per video); `augment_s` is
         the augmentation's share of the step.
  data   VideoClipDataset.__getitem__ (2 clips: decode JPEGs, temporal difference, crop + resize to --crop_size)
         in this process with one torch thread, as one DataLoader worker runs it: clips/s per worker process
         (= per CPU core when --num_threads_io/--num_threads_decode are 0), on the demo videos (64x80 frames)
         and on the same videos upscaled to Kinetics' short side 256 (256x320 JPEGs, as in the reference run),
         since JPEG decoding scales with the frame size. `cores_to_feed_step` = step clips/s / data clips/s per core.

    python bench/bench_sce.py --device cpu --batch_size 2 --steps 1 --threads 2            # this CPU
    python bench/bench_sce.py --batch_size 64 --amp fp16 --steps 10                        # one GPU (64 = 512/8)
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import report  # noqa: E402  (bench/report.py, next to this script)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import main_sce  # noqa: E402
from main_sce import build_sce  # noqa: E402
from util.sce.hooks import SCEHook  # noqa: E402
from util.sce.optim import build_lars  # noqa: E402
from util.train_step import TrainStep  # noqa: E402
from util.sce.augment import build_sce_augmentations  # noqa: E402
from util.sce.data import VideoClipDataset  # noqa: E402
from util.video.demo import make_demo_videos  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch_size', type=int, default=4, help='videos per step (per GPU)')
    p.add_argument('--num_frames', type=int, default=8)
    p.add_argument('--crop_size', type=int, default=224)
    p.add_argument('--queue_size', type=int, default=32768)
    p.add_argument('--amp', choices=['fp16', 'bf16', 'none'], default='none')
    p.add_argument('--channels_last', action='store_true', help='channels_last_3d trunk and input')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--threads', type=int, default=None, help='torch threads for the step part')
    p.add_argument('--data_samples', type=int, default=16, help='videos timed per data variant (0: skip data)')
    p.add_argument('--time_difference_prob', type=float, default=0.2)
    p.add_argument('--num_threads_io', type=int, default=0, help='JPEG threads inside the dataset (0: none)')
    p.add_argument('--num_threads_decode', type=int, default=0)
    p.add_argument('--skip_step', action='store_true')
    p.add_argument('--json', default=None, help='append the result to this file as one JSON line')
    return p.parse_args()


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, warmup, steps, device):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def build_step(args, device):
    """(one full SCE training step, the augmentation of both views) as closures, on a synthetic batch of
    args.batch_size videos."""
    model_args = main_sce.get_args_parser().parse_args(['--queue_size', str(args.queue_size)])
    model = build_sce(model_args, steps_per_epoch=1000, epochs=200).to(device).train()
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    optimizer = build_lars(model, lr=4.8)
    trainer = TrainStep(model, optimizer, device, args.amp)
    hooks = [SCEHook(model)]
    compute_loss = main_sce.TwoViewLoss([a.to(device) for a in build_sce_augmentations()])
    size, T = args.crop_size, args.num_frames
    samples = torch.randint(0, 256, (args.batch_size, 2, 3, T, size, size), dtype=torch.uint8, device=device)

    def step():
        with trainer.autocast():
            loss, _ = compute_loss(model, samples, None)
        trainer.backward(loss)
        trainer.step(hooks)

    def augment():
        for i, aug in enumerate(compute_loss.augmentations):
            aug(samples[:, i]).contiguous(memory_format=fmt)
    return step, augment


def bench_step(args, device):
    """Seconds per full SCE step and per augmentation of both views, for a batch of args.batch_size videos."""
    step, augment = build_step(args, device)
    return timed(step, args.warmup, args.steps, device), timed(augment, args.warmup, args.steps, device)


def upscaled_copy(root, short_side=256):
    """The demo train split with every frame resized to a short side of `short_side` (aspect kept)."""
    out = Path(tempfile.mkdtemp(prefix='sce_bench_'))
    shutil.copy(root / 'train.csv', out / 'train.csv')
    for src in (root / 'train').rglob('*.jpg'):
        dst = out / 'train' / src.relative_to(root / 'train')
        dst.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(src)
        scale = short_side / min(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR).save(dst, quality=90)
    return out


def bench_data(args, root):
    """Videos/s of VideoClipDataset in this process with one torch thread (one DataLoader worker)."""
    ds = VideoClipDataset(root / 'train.csv', root / 'train', num_frames=args.num_frames, crop_size=args.crop_size,
                          time_difference_prob=args.time_difference_prob, num_threads_io=args.num_threads_io,
                          num_threads_decode=args.num_threads_decode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds[0]  # warm-up (thread pool, caches)
        start = time.perf_counter()
        for i in range(args.data_samples):
            ds[(i + 1) % len(ds)]
        seconds = (time.perf_counter() - start) / args.data_samples
    finally:
        torch.set_num_threads(threads)
    frame = Image.open(next((root / 'train').rglob('*.jpg'))).size
    return {'frame_size_wh': list(frame), 'videos_per_s_per_worker': 1 / seconds,
            'clips_per_s_per_worker': ds.num_clips / seconds}


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
              'threads': torch.get_num_threads(), 'batch_size': args.batch_size, 'num_frames': args.num_frames,
              'crop_size': args.crop_size, 'queue_size': args.queue_size, 'amp': args.amp,
              'channels_last': args.channels_last, 'steps': args.steps}
    if not args.skip_step:
        step_s, augment_s = bench_step(args, device)
        result.update(step_s=step_s, augment_s=augment_s, augment_share=augment_s / step_s,
                      videos_per_s=args.batch_size / step_s, clips_per_s=2 * args.batch_size / step_s)
    if args.data_samples:
        demo = make_demo_videos()
        big = upscaled_copy(demo)
        try:
            result['data'] = {'time_difference_prob': args.time_difference_prob,
                              'num_threads_io': args.num_threads_io, 'demo': bench_data(args, demo),
                              'short_side_256': bench_data(args, big)}
        finally:
            shutil.rmtree(big, ignore_errors=True)
        if 'clips_per_s' in result:
            per_core = result['data']['short_side_256']['clips_per_s_per_worker']
            result['cores_to_feed_step'] = result['clips_per_s'] / per_core
    report(result, args.json)


if __name__ == '__main__':
    main()
