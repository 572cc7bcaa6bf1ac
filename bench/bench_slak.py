"""Speed of SLaK's exact depthwise-conv routes: one SLaK-T stage and the whole SLaK-T (width 1.3, Decom, bn).

Training = forward + backward in train mode; inference = forward in eval mode without autograd. Routes:
dense (F.conv2d, full kernel), crop (kernel cropped to the reachable (2H-1) x (2W-1) part), fft (torch.fft,
one transform of x for the three branches; in eval the branches are folded into one kernel), merged
(`reparameterize()`, then crop; inference only) and auto (the model default). Median over --steps, after
--warmup untimed ones; CUDA synchronised around each. ConvNeXt-T (timm convnext_tiny) is timed with the same
code for reference. The CPU numbers that set `auto_impl` are in docs/RESULTS.md.

    python bench/bench_slak.py --threads 2 --batch_size 4              # CPU
    python bench/bench_slak.py --device cuda --batch_size 64 --json slak.jsonl
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

from models.slak import reparameterize, set_conv_impl  # noqa: E402  (registers SLaK_*)

TRAIN_ROUTES = ('dense', 'crop', 'fft', 'auto')
EVAL_ROUTES = ('dense', 'crop', 'fft', 'merged', 'auto')


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--parts', default='stages,network,convnext', help='comma list of stages, network, convnext')
    p.add_argument('--routes', default=None, help='comma list of routes (default: all)')
    p.add_argument('--json', default=None, help='append every result to this file as JSON lines')
    return p.parse_args()


def median_seconds(fn, args, device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timer(module, x, training):
    """A closure running one training step (forward + backward) or one inference forward."""
    module.train(training)
    if training:
        def step():
            module(x).float().mean().backward()
            module.zero_grad(set_to_none=True)
        return step
    return torch.no_grad()(lambda: module(x))


def with_route(model, route):
    if route == 'merged':
        return reparameterize(set_conv_impl(model, 'crop'))
    return set_conv_impl(model, route)


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = args.parts.split(',')
    wanted = args.routes.split(',') if args.routes else None
    results = []

    def record(**row):
        row.update(device=str(device), batch_size=args.batch_size, input_size=args.input_size)
        results.append(row)
        print(f"{row['part']:>9} {row['mode']:>9} {row['route']:>7}: {row['seconds'] * 1e3:9.1f} ms"
              f"  {row['img_s']:8.1f} img/s", flush=True)

    def run(part, build, x):
        for mode, routes in (('training', TRAIN_ROUTES), ('inference', EVAL_ROUTES)):
            for route in routes:
                if wanted and route not in wanted:
                    continue
                module = with_route(build().to(device), route)
                sec = median_seconds(timer(module, x, mode == 'training'), args, device)
                record(part=part, mode=mode, route=route, seconds=sec, img_s=args.batch_size / sec)
                del module

    net = lambda: timm.create_model('SLaK_tiny', Decom=True, width_factor=1.3)  # noqa: E731
    if 'stages' in parts:
        full = net()
        for i, stage in enumerate(full.stages):
            size = args.input_size // 4 // 2 ** i
            x = torch.randn(args.batch_size, full.dims[i], size, size, device=device)
            run(f'stage{i + 1}', lambda: copy.deepcopy(stage), x)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if 'network' in parts:
        run('SLaK-T', net, images)
    if 'convnext' in parts:
        for mode in ('training', 'inference'):
            model = timm.create_model('convnext_tiny').to(device)
            sec = median_seconds(timer(model, images, mode == 'training'), args, device)
            record(part='ConvNeXt-T', mode=mode, route='-', seconds=sec, img_s=args.batch_size / sec)
    if args.json:
        with open(args.json, 'a') as f:
            for row in results:
                f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
    main()
