"""Images/s per CPU core of the LocalMIM pretraining input pipeline: the official one, ours, and `--fast_data`.

Pipelines (224 px RandomResizedCrop scale 0.2-1, bicubic, flip, ImageNet normalisation):
  official    torchvision ImageFolder + PIL decode + the torchvision transform (float32 from the workers)
  ours        util.data.datasets.ImageFolderOrFlat + build_pretrain_transform (the run_pretrain.py default)
  cpu         --fast_data cpu: box from the header, uint8 crop (torch's bicubic kernel), normalised on the device
  cpu_draft   --fast_data cpu_draft: also reduced-scale JPEG decoding of crops >= 2x the output size
  device      --fast_data device: workers read bytes and draw the box; the device (nvJPEG) decodes and crops
Each is run through a DataLoader with 1, 2, ... workers over a few hundred generated JPEGs (ImageNet-like sizes:
mostly 500 px on the long side, some smaller, 12% larger; quality 90; cached under .cache/). A pass is timed
once the workers run; "per core" divides by the CPU time of the main process and its workers. With --device cuda
the time includes each batch's step on the GPU (host-to-device copy, float conversion and normalisation, or the
decoding), also timed alone; with --device cpu the fast pipelines' device step (normalisation; for `device` the
decoding too) is left out of the loader's rate, as on a GPU it runs there, and reported apart: its CPU time per image on this CPU, and the rate
with it counted. Pipelines alternate within each round and the median over rounds is reported, so load from other
processes on the machine hits all alike. `MAD` is the mean absolute difference, in grey levels, to the official
output for the same random boxes and flips.

    python bench/bench_data.py --quick                       # CPU, under a minute; a smoke test (64 images)
    python bench/bench_data.py --device cuda --json data.jsonl
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, default_collate  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from util.data.datasets import build_pretrain_dataset  # noqa: E402
from util.data.demo_data import REPOSITORY_ROOT, build_once  # noqa: E402
from util.data.fast_image import DeviceInput  # noqa: E402

PHOTOGRAPHS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina',
               'stereo_motorcycle')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_like_size(rng):
    """(width, height): 60% 500 px on the long side (4:3, 3:2, 5:4, 1:1), 28% 200-500 px, 9% 500-1000 px,
    3% 1000-2000 px; four in five landscape."""
    kind = rng.choice(4, p=[0.60, 0.28, 0.09, 0.03])
    long_side = [500, rng.integers(200, 500), rng.integers(501, 1000), rng.integers(1000, 2000)][kind]
    short_side = int(round(long_side / rng.choice([4 / 3, 3 / 2, 5 / 4, 1.0], p=[0.5, 0.25, 0.1, 0.15])))
    return (long_side, short_side) if rng.random() < 0.8 else (short_side, long_side)


def write_jpegs(folder, count):
    """Crops of scikit-image's photographs at ImageNet-like sizes with a little grain, JPEG quality 90."""
    from skimage import data as skimage_data
    photos = [getattr(skimage_data, name)() for name in PHOTOGRAPHS]
    photos = [Image.fromarray((p[0] if isinstance(p, tuple) else p)[..., :3]) for p in photos]
    rng = np.random.default_rng(0)
    (folder / 'images').mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = imagenet_like_size(rng)
        side = rng.uniform(0.5, 1.0) * min(photo.width / w, photo.height / h)  # crop of the target's aspect
        cw, ch = max(int(w * side), 8), max(int(h * side), 8)
        left, top = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
        image = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 12, (h, w, 1))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / 'images' / f'{i:05d}.jpg', quality=90)


def official_dataset(root, size):
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return datasets.ImageFolder(str(root), transform=transform)


def build_pipelines(root, size, device):
    """name -> (dataset, the per-batch step counted in the loader's rate, the device step that gives the model's
    input). Off CUDA the fast pipelines' device step is not counted in the loader's rate (in training it runs on
    the accelerator); it is timed apart."""
    to_input = DeviceInput(size, device)
    moved = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    on_device = lambda x: to_input(moved(x))  # noqa: E731
    pipelines = {'official': (official_dataset(root, size), moved, moved),
                 'ours': (build_pretrain_dataset(root, size), moved, moved)}
    for mode in ('cpu', 'cpu_draft', 'device'):
        counted = on_device if device.type == 'cuda' else (lambda x: x)
        pipelines[mode] = (build_pretrain_dataset(root, size, mode), counted, on_device)
    return pipelines


def device_step_rate(dataset, to_input, batch_size, device, repeats=5):
    """Images/s of the device step alone (host batch -> normalised float batch on the device): per second of
    wall time on a GPU, per CPU second (all threads of this process) on the CPU."""
    cuda = device.type == 'cuda'
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=2, pin_memory=cuda)
    batches = [samples for (samples, _), _ in zip(loader, range(3))]
    clock = time.perf_counter if cuda else time.process_time
    to_input(batches[0])
    torch.cuda.synchronize() if cuda else None
    start = clock()
    for _ in range(repeats):
        for samples in batches:
            to_input(samples)
    torch.cuda.synchronize() if cuda else None
    elapsed = clock() - start
    return repeats * sum(len(b) for b in batches) / elapsed if elapsed > 0 else float('inf')


def timed_pass(dataset, to_input, workers, batch_size, device, images):
    """(images/s, images per CPU-second) of a pass of `images` random samples through started loader workers (on
    ImageNet their start-up is a negligible part of an epoch), to the last batch on the device. CPU time is the
    main process's plus its workers': a per-core figure that other load on the machine hardly distorts."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, num_samples=images),
                        num_workers=workers, drop_last=True, pin_memory=device.type == 'cuda',
                        persistent_workers=True)
    next(iter(loader))  # starts the workers
    batches = iter(loader)  # the warm-up's other batches are done (and dropped) by now
    pids = [os.getpid()] + [w.pid for w in batches._workers]
    cpu_start, start, count = _cpu_seconds(pids), time.perf_counter(), 0
    for samples, _ in batches:
        count += len(to_input(samples))
    if device.type == 'cuda':
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu_start
    batches._shutdown_workers()
    return count / wall, count / cpu


def _cpu_seconds(pids):
    """CPU seconds these (Linux) processes ran, all their threads (scheduler statistics: nanoseconds)."""
    total = 0
    for pid in pids:
        for task in os.listdir(f'/proc/{pid}/task'):
            try:
                with open(f'/proc/{pid}/task/{task}/schedstat') as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
    return total / 1e9


def pixel_difference(root, size, modes, device, count):
    """Mean absolute difference (grey levels) of each fast mode's output to the official one, same RNG state."""
    official = build_pretrain_dataset(root, size)
    to_input = DeviceInput(size, device)
    std = torch.tensor(STD, device=device).view(3, 1, 1) * 255
    diffs = {mode: [] for mode in modes}
    for mode in modes:
        fast = build_pretrain_dataset(root, size, mode)
        for i in range(count):
            torch.manual_seed(i)
            expected = official[i][0].to(device)
            torch.manual_seed(i)
            sample = fast[i][0]
            got = to_input(default_collate([sample]).to(device))[0]
            diffs[mode].append(float(((got - expected).abs() * std).mean()))
    return {mode: statistics.mean(values) for mode, values in diffs.items()}


def parse_workers(text):
    cores = len(os.sched_getaffinity(0))
    return sorted({cores if w == 'all' else int(w) for w in text.split(',')})


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='fewer images and rounds (under a minute on a CPU)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--workers', default='1,2,all', help="DataLoader workers to try, e.g. 1,2,all")
    p.add_argument('--images', type=int, default=None, help='generated images (default 400; --quick 64); a pass '
                                                            'reads them, or 4 batches per worker if that is more')
    p.add_argument('--rounds', type=int, default=None, help='passes per pipeline and worker count (default 5; '
                                                            '--quick 3)')
    p.add_argument('--batch_size', type=int, default=None, help='default 32; --quick 16')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--json', default=None, help='append one JSON line per result to this file')
    return p.parse_args()


def main():
    args = get_args()
    images = args.images or (64 if args.quick else 400)
    rounds = args.rounds or (3 if args.quick else 5)
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('bench_data.py: --device cuda but no CUDA device is available')
    device = torch.device(args.device)
    root = build_once(REPOSITORY_ROOT / '.cache' / f'bench_jpegs_v3_{images}', lambda f: write_jpegs(f, images),
                      'benchmark JPEGs')
    files = sorted((root / 'images').iterdir())
    sizes = [Image.open(f).size for f in files]
    print(f'{len(files)} JPEGs, mean {np.mean([w for w, _ in sizes]):.0f} x {np.mean([h for _, h in sizes]):.0f} '
          f'px, {sum(f.stat().st_size for f in files) / len(files) / 1e3:.0f} KB per file (ImageNet-1k train: about '
          f'110), {root}')

    pipelines = build_pipelines(root, args.input_size, device)
    workers = parse_workers(args.workers)
    speeds = {(name, w): [] for name in pipelines for w in workers}
    for _ in range(rounds):
        for w in workers:
            for name, (dataset, to_input, _) in pipelines.items():
                pass_images = max(images, 4 * w * args.batch_size)  # every worker busy
                speeds[name, w].append(timed_pass(dataset, to_input, w, args.batch_size, device, pass_images))
    mad = pixel_difference(root, args.input_size, [n for n in pipelines if n not in ('official', 'ours')], device,
                           16 if args.quick else 128)

    device_rates = {name: device_step_rate(dataset, step, args.batch_size, device)
                    for name, (dataset, _, step) in pipelines.items()}
    cuda = device.type == 'cuda'
    print('\n| pipeline | workers | images/s | images/s per core | vs official (per core) | MAD vs official '
          '(grey levels) | ' + ('device step images/s |' if cuda else
                                'device step CPU ms/image | per core, device step counted | vs official |'))
    print('|---|---|---|---|---|---|---|' + ('' if cuda else '---|---|'))
    for name in pipelines:
        for w in workers:
            wall = statistics.median(r[0] for r in speeds[name, w])
            per_core = statistics.median(r[1] for r in speeds[name, w])
            base = statistics.median(r[1] for r in speeds['official', w])
            row = f'| {name} | {w} | {wall:.0f} | {per_core:.0f} | {per_core / base:.2f}x | {mad.get(name, 0):.3f} |'
            with_step = per_core if cuda else 1 / (1 / per_core + 1 / device_rates[name])
            print(row + (f' {device_rates[name]:.0f} |' if cuda else
                         f' {1e3 / device_rates[name]:.2f} | {with_step:.0f} | {with_step / base:.2f}x |'))
            if args.json:
                with open(args.json, 'a') as f:
                    f.write(json.dumps({
                        'bench': 'data', 'pipeline': name, 'workers': w, 'device': args.device, 'images_per_s': wall,
                        'images_per_cpu_s': per_core, 'vs_official': per_core / base,
                        'images_per_cpu_s_with_device_step': with_step,
                        'mad_grey_levels': mad.get(name, 0.0), 'device_step_images_per_s': device_rates[name],
                        'rounds': speeds[name, w], 'images': images, 'batch_size': args.batch_size,
                        'input_size': args.input_size, 'quick': args.quick}) + '\n')


if __name__ == '__main__':
    main()
