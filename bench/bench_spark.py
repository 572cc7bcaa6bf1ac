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

With --official PATH (the pretrain/ folder of a copy of https://github.com/keyu-tian/SparK; ResNets only) it
instead times one plain step (forward, backward, AdamW) of our SparK and of the official one, same weights,
batch and mask, alternately for --rounds rounds, and reports the medians, the spread and our/official ratio:

    python bench/bench_spark.py --official /tmp/SparK/pretrain --batch_size 4 --threads 2 --rounds 7
"""
import argparse
import math
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import report  # noqa: E402  (bench/report.py, next to this script)

import timm  # noqa: E402
from timm.optim import Lamb  # noqa: E402
import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from models.spark import build_spark, spark_default_drop_path  # noqa: E402
from models.spark_sparse import hierarchical_forward  # noqa: E402
from util.spark.schedule import spark_param_groups  # noqa: E402
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
    p.add_argument('--official', default=None, metavar='PATH',
                   help="the official SparK's pretrain/ folder: time our step against the official one")
    p.add_argument('--rounds', type=int, default=7, help='with --official: alternating rounds of --steps each')
    p.add_argument('--profile', action='store_true', help='with --official: print the top CPU ops of both')
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


def import_official(path):
    """The official pretrain/ modules, imported without running their timm monkey-patches (models/ patches
    timm's ResNet.forward for the whole process) and without utils/misc.py, whose imports (pytz, ...) the
    decoder does not need."""
    sys.path.insert(0, path)
    utils = types.ModuleType('utils')
    utils.misc = types.ModuleType('utils.misc')
    utils.misc.is_pow2n = lambda x: x > 0 and (x & (x - 1) == 0)
    saved = {name: sys.modules.get(name) for name in ('utils', 'utils.misc')}
    sys.modules.update({'utils': utils, 'utils.misc': utils.misc})
    try:
        import decoder
        import encoder
        import spark
    finally:
        sys.path.remove(path)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    return encoder, decoder, spark


class OfficialResNet(timm.models.resnet.ResNet):
    """timm's ResNet with the three methods the official encoder calls (its models/resnet.py adds them to
    timm's class); used by changing an instance's class, so no other ResNet is touched."""

    def get_downsample_ratio(self):
        return 32

    def get_feature_map_channels(self):
        return [info['num_chs'] for info in self.feature_info[1:]]

    def forward(self, x, hierarchical=True):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def build_official(args, ours, dp):
    """The official SparK for args.model holding exactly the weights and buffers of `ours`."""
    encoder, decoder, spark = import_official(os.path.abspath(args.official))
    cnn = timm.create_model(args.model, num_classes=0, global_pool='', drop_path_rate=dp)
    if not isinstance(cnn, timm.models.resnet.ResNet):
        raise SystemExit('--official compares ResNets only (the official ConvNeXt is its own model)')
    cnn.__class__ = OfficialResNet
    sparse_encoder = encoder.SparseEncoder(cnn, args.input_size, sbn=False)
    dense_decoder = decoder.LightDecoder(sparse_encoder.downsample_raito, width=768, sbn=False)
    official = spark.SparK(sparse_encoder, dense_decoder, mask_ratio=args.mask, densify_norm='bn', sbn=False)
    official.load_state_dict(ours.state_dict())
    return official


def compare_official(args, device):
    """Our step against the official step (same weights, batch, mask, optimizer), alternating rounds."""
    dp = spark_default_drop_path(args.model)
    ours = build_spark(args.model, args.input_size, args.mask, dp=dp).to(device).train()
    official = build_official(args, ours, dp).to(device).train()
    B, size = args.batch_size, args.input_size
    imgs = torch.randn(B, 3, size, size, device=device)
    mask = ours.mask(B, device)
    torch.manual_seed(0)
    loss_ours = ours(imgs, active_b1ff=mask).item()
    torch.manual_seed(0)
    loss_official = official(imgs, active_b1ff=mask).item()

    def stepper(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(imgs, active_b1ff=mask).backward()
            opt.step()
        return step

    steps = {'ours': stepper(ours), 'official': stepper(official)}
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}  # with --threads 1, CPU seconds hardly see other load on the machine
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            cpu_start = time.process_time()
            times[name].append(timed(step, 0, args.steps, device))
            cpu_times[name].append((time.process_time() - cpu_start) / args.steps)
    if args.profile:
        for name, step in steps.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(f'--- {name}\n' + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    result = {
        'model': args.model, 'threads': torch.get_num_threads(), 'batch_size': B, 'input_size': size,
        'mask': args.mask, 'drop_path': dp, 'rounds': args.rounds, 'steps_per_round': args.steps,
        'loss_ours': loss_ours, 'loss_official': loss_official,
        'ours_step_s': med['ours'], 'official_step_s': med['official'],
        'ours_range_s': [min(times['ours']), max(times['ours'])],
        'official_range_s': [min(times['official']), max(times['official'])],
        'ratio_ours_to_official': med['ours'] / med['official'],
        'round_ratios': [a / b for a, b in zip(times['ours'], times['official'])],
        'ours_step_cpu_s': cpu['ours'], 'official_step_cpu_s': cpu['official'],
        'cpu_ratio_ours_to_official': cpu['ours'] / cpu['official'],
        'round_cpu_ratios': [a / b for a, b in zip(cpu_times['ours'], cpu_times['official'])],
    }
    report(result, args.json)


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official:
        return compare_official(args, torch.device(args.device))
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
