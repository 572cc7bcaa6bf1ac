"""Throughput cases of the GPU suite, each built from the bench/bench_*.py functions (synthetic batch on the device).

    python bench/suite_speed.py localmim --device cuda --result out.json [--quick] [--compile]

Every case reports images/s (videos/s for SCE), ms per step, GFLOP per image of forward + backward (counted with
FlopCounterMode on one eager step), the model-FLOPs utilisation against the device's dense bf16 peak
(bench_pretrain.PEAK_FLOPS) and the peak memory (torch.cuda.max_memory_allocated over the timed steps).
Full sizes are the papers' (ViT-B/16 224 px batch 256, ...); --quick uses tiny models and sizes.
"""
import argparse
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

import models  # noqa: E402,F401  (registers the models)
from bench import bench_freezeout, bench_pretrain, bench_sce, bench_slak  # noqa: E402
from bench.freezeout_scaling import run_savings  # noqa: E402
from util.train_step import TrainStep  # noqa: E402


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def mfu(flops_per_step, seconds, device):
    if device.type != 'cuda' or not flops_per_step:
        return None
    peak = bench_pretrain.peak_flops(device, 'bf16', None)
    return flops_per_step / seconds / peak if peak else None


def throughput(step, batch, device, warmup, steps, model=None, compile=False):
    """Counts the FLOPs of one eager step, compiles `model` in place if asked, times `steps` steps after
    `warmup` ones; returns the result dict."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=bench_pretrain.CPU_SDPA_FLOPS
                                      if device.type == 'cpu' else None) as counter:
        step()
    if compile:
        model.compile()
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - started
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops()
    return {'batch_size': batch, 'images_per_s': batch / seconds, 'ms_per_step': 1e3 * seconds,
            'gflop_per_image': flops / batch / 1e9, 'mfu': mfu(flops, seconds, device), 'warmup_s': warmup_s,
            'peak_mem_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None,
            'steps': steps, 'compile': compile}


def adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)


def localmim(args, device):
    model, batch, size = ('MIM_vit_tiny_patch16', 2, 32) if args.quick else ('MIM_vit_base_patch16', 256, 224)
    ns = SimpleNamespace(model=model, input_size=size, batch_size=batch, mask_ratio=0.75, amp=args.amp,
                         compile=args.compile, device=str(device), warmup=args.warmup, steps=args.steps,
                         count_flops=True, peak_tflops=None)
    res, line = bench_pretrain.measure(ns)
    print(line, flush=True)
    return {'what': f'LocalMIM {model}, {size} px', **res}


def freezeout(args, device):
    """Every frozen depth of the README's cubic schedule: the exact step, an exact-cache hit, a feature-masking hit
    and a store miss, timed and counted, and the whole-run saving of each variant (one process)."""
    model, batch, size = ('MIM_vit_tiny_patch16', 2, 32) if args.quick else ('MIM_vit_base_patch16', 128, 224)
    ns = SimpleNamespace(model=model, input_size=size, batch_size=batch, mask_ratio=0.75, amp=args.amp,
                         compile=args.compile, device=str(device), warmup=min(args.warmup, 3), steps=min(args.steps, 8),
                         how_scale='cubic', t_0=0.8, epochs=100, warmup_epochs=10, feature_masking=True,
                         feature_target='hog', flops_only=False)
    rows, _, fused = bench_freezeout.sweep(ns, device, count_flops=True)
    for r in rows:
        r['gflop_per_image'] = r['flops'] / batch / 1e9
    savings = {unit: {'sticky': run_savings(rows, ns.epochs, ns.warmup_epochs, unit)} for unit in ('s', 'flops')}
    return {'what': f'FreezeOut {model}, {size} px', 'batch_size': batch, 'fused_adamw': fused, 'depths': rows,
            'stored_path_savings': savings}


def classifier_step(trainer, model, images, labels):
    """One cross-entropy training step of `model` on a fixed batch, as a function."""
    def step():
        with trainer.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        trainer.backward(loss)
        trainer.step()
    return step


def finetune(args, device):
    model_name, batch, size = ('vit_tiny_patch16_224', 2, 32) if args.quick else ('vit_base_patch16_224', 256, 224)
    model = timm.create_model(model_name, img_size=size, num_classes=1000).to(device).train()
    trainer = TrainStep(model, adamw(param_groups_weight_decay(model, 0.05), device), device, amp=args.amp)
    imgs = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    step = classifier_step(trainer, model, imgs, labels)
    return {'what': f'fine-tune {model_name}, {size} px',
            **throughput(step, batch, device, args.warmup, args.steps, model, args.compile)}


def spark(name):
    def case(args, device):
        if args.compile:
            raise Skip('bench/bench_spark.py has no --compile')
        model, batch, size = {('resnet50', True): ('resnet18', 2, 64), ('resnet50', False): ('resnet50', 128, 224),
                              ('convnext_base', True): ('convnext_atto', 2, 64),
                              ('convnext_base', False): ('convnext_base', 64, 224)}[name, args.quick]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / 'spark.jsonl'
            argv = ['--model', model, '--batch_size', str(batch), '--input_size', str(size), '--amp', args.amp,
                    '--device', str(device), '--warmup', str(args.warmup), '--steps', str(args.steps), '--json',
                    str(out)] + (['--channels_last'] if device.type == 'cuda' else [])
            saved, sys.argv = sys.argv, [str(BENCH / 'bench_spark.py'), *argv]
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            try:
                runpy.run_path(str(BENCH / 'bench_spark.py'), run_name='__main__')
            finally:
                sys.argv = saved
            res = json.loads(out.read_text().splitlines()[-1])
        flops = res['step_gflop_per_img'] * 1e9 * batch
        return {'what': f'SparK {model}, {size} px', 'batch_size': batch, 'images_per_s': res['img_per_s'],
                'ms_per_step': 1e3 * res['step_s'], 'gflop_per_image': res['step_gflop_per_img'],
                'mfu': mfu(flops, res['step_s'], device), 'compile': False,
                # over the whole bench (FLOP counting and encoder-only passes included), not the step alone
                'peak_mem_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None,
                'encoder_share_of_step': res['encoder_share_of_step']}
    return case


def slak(args, device):
    if args.compile:
        raise Skip('SLaK routes are timed eager (the FFT route and per-route recompiles)')
    batch, size, width = (2, 32, 0.25) if args.quick else (64, 224, 1.3)
    images = torch.randn(batch, 3, size, size, device=device)
    rows = {}
    for route in ('dense', 'crop', 'fft', 'auto'):
        try:
            model = bench_slak.with_route(
                timm.create_model('SLaK_tiny', Decom=True, width_factor=width).to(device), route)
            optimizer = adamw(param_groups_weight_decay(model, 0.05), device)
            trainer = TrainStep(model, optimizer, device, amp=args.amp)
            labels = torch.randint(0, 1000, (batch,), device=device)
            step = classifier_step(trainer, model, images, labels)
            rows[route] = throughput(step, batch, device, args.warmup, args.steps)
        except Exception as error:  # a route that fails must not hide the others
            rows[route] = {'error': f'{type(error).__name__}: {error}'[:500]}
        finally:
            model = optimizer = trainer = None
    failed = [r for r, v in rows.items() if 'error' in v]
    if failed:
        raise RuntimeError(f'routes {failed} failed: {rows}')
    return {'what': f'SLaK-T (width {width}), {size} px', 'batch_size': batch, 'routes': rows}


def sce(args, device):
    if args.compile:
        raise Skip('bench/bench_sce.py times the step eager')
    batch, frames, size, queue = (2, 4, 32, 64) if args.quick else (32, 8, 224, 32768)
    ns = SimpleNamespace(queue_size=queue, channels_last=False, amp=args.amp, crop_size=size, num_frames=frames,
                         batch_size=batch, warmup=args.warmup, steps=args.steps)
    step, augment = bench_sce.build_step(ns, device)
    res = throughput(step, batch, device, args.warmup, args.steps)
    res['clips_per_s'] = 2 * res['images_per_s']
    res['augment_ms'] = 1e3 * bench_sce.timed(augment, 1, args.steps, device)
    return {'what': f'SCE R3D-18, {frames}x{size}x{size} clips, GPU augmentation', **res}


class Skip(Exception):
    """This case does not apply (the reason is the message)."""


CASES = {'localmim': localmim, 'freezeout': freezeout, 'finetune': finetune, 'spark_resnet': spark('resnet50'),
         'spark_convnext': spark('convnext_base'), 'slak': slak, 'sce': sce}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('case', choices=sorted(CASES))
    p.add_argument('--device', default='cuda')
    p.add_argument('--quick', action='store_true')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--amp', default=None, help='default: bf16 on CUDA; none on CPU (bf16 is emulated and slow there)')
    p.add_argument('--warmup', type=int, default=None, help='default: 5 on CUDA (full), else 1')
    p.add_argument('--steps', type=int, default=None, help='default: 10 on CUDA (full), else 2')
    p.add_argument('--result', required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    full_cuda = device.type == 'cuda' and not args.quick
    args.amp = args.amp or ('bf16' if device.type == 'cuda' else 'none')
    args.warmup = args.warmup if args.warmup is not None else (5 if full_cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if full_cuda else 2 if device.type == 'cuda' else 1)
    try:
        res = {'status': 'ok', **CASES[args.case](args, device)}
        if res.get('mfu') is None and device.type == 'cuda':
            res['mfu_note'] = 'no peak known for this device (bench_pretrain.PEAK_FLOPS)'
    except Skip as reason:
        res = {'status': 'skipped', 'reason': str(reason)}
    res['amp'] = args.amp
    res['device_name'] = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    Path(args.result).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, default=str))


if __name__ == '__main__':
    main()
