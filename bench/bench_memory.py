"""Peak memory of one training step with and without --grad_ckpt (activation checkpointing), per model family.

One step = forward + backward of the family's loss on a synthetic batch. Reported: the activation peak, i.e. the
peak of memory allocated during the step above what was allocated at its start (weights and gradients, which
stay allocated and are the same either way; so is the optimizer state, not created here), and the step time
(median of alternating repeats).

  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(); also the total peak, weights
        and gradients included. Without --quick at the official per-GPU batch sizes.
  CPU   PyTorch's CPU allocator has no peak counter, but with torch.profiler(profile_memory=True) it reports
        every allocation and free (`[memory]` events, +/- bytes); their running sum in time order gives the
        peak. It counts tensors only (not oneDNN's scratch space or the Python heap), which is what
        checkpointing changes. Batch --batch_size (default 2) at the official resolution.

    python bench/bench_memory.py --device cpu --quick --json memory.jsonl
    python bench/bench_memory.py --device cuda --json memory.jsonl                 # official batch sizes
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import main_sce  # noqa: E402
import models  # noqa: E402,F401  (registers the models with timm)


def localmim():
    model = timm.create_model('MIM_vit_base_patch16', img_size=224)
    return model, lambda b: torch.rand(b, 3, 224, 224), lambda m, x: m(x, 0.75)[0]


def finetune_vit():
    model = timm.create_model('vit_base_patch16', num_classes=1000, drop_path_rate=0.1)
    return model, lambda b: torch.randn(b, 3, 224, 224), classification_loss


def slak():
    model = timm.create_model('SLaK_tiny', Decom=True, width_factor=1.3, kernel_size=[51, 49, 47, 13, 5],
                              drop_path_rate=0.1)
    return model, lambda b: torch.randn(b, 3, 224, 224), classification_loss


def sce():
    model = main_sce.build_sce(main_sce.get_args_parser().parse_args(['--data_path', 'demo']))
    return model, lambda b: torch.randn(2, b, 3, 8, 224, 224), lambda m, views: m(list(views))[0]


def classification_loss(model, x):
    return F.cross_entropy(model(x), torch.arange(len(x), device=x.device) % 1000)


# family: (what it is, builder, official batch per GPU)
FAMILIES = {
    'localmim': ('LocalMIM MIM_vit_base_patch16, 224 px, mask 0.75', localmim, 256),
    'finetune_vit': ('fine-tune vit_base_patch16, 224 px, drop path 0.1', finetune_vit, 128),
    'slak': ('SLaK_tiny (width 1.3, Decom, 51-49-47-13-5), 224 px, drop path 0.1', slak, 128),
    'sce': ('SCE R3D-18, 2 views of 8x224x224 clips, queue 32768', sce, 64),
}


def cpu_peak_bytes(step):
    """Peak bytes of live CPU tensors allocated during step() above the level at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]' and e.device_type()
              == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(step, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    total = torch.cuda.max_memory_allocated(device)
    return total - start, total


def measure(family, device, batch, amp, repeats):
    """[result per mode (grad_ckpt False, True)] for one family."""
    title, build, _ = FAMILIES[family]
    model, make_input, loss_fn = build()
    model.to(device).train()
    x = make_input(batch).to(device)
    autocast = torch.autocast(device.type, torch.bfloat16) if amp == 'bf16' else contextlib.nullcontext()

    for p in model.parameters():  # gradients stay allocated, so the step's peak above its start is activations
        if p.requires_grad:
            p.grad = torch.zeros_like(p)

    def step():
        with autocast:
            loss = loss_fn(model, x)
        loss.backward()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    results = {}
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        total = None
        model.zero_grad(set_to_none=False)
        if device.type == 'cuda':
            step()  # warm-up: lazy allocations, cuDNN autotuning
            peak, total = cuda_peak_bytes(step, device)
        else:
            peak = cpu_peak_bytes(step)
        results[ckpt] = dict(bench='memory', family=family, model=title, device=device.type, batch=batch, amp=amp,
                             grad_ckpt=ckpt, peak_step_mib=round(peak / 2 ** 20, 1), step_s=[])
        if total is not None:
            results[ckpt]['peak_total_mib'] = round(total / 2 ** 20, 1)
    for _ in range(repeats):  # alternate, so that load from other processes hits both modes alike
        for ckpt in (False, True):
            model.set_grad_checkpointing(ckpt)
            start = time.perf_counter()
            step()
            results[ckpt]['step_s'].append(time.perf_counter() - start)
    for r in results.values():
        r['step_s'] = round(statistics.median(r['step_s']), 3) if r['step_s'] else None
    model = x = None  # freed before empty_cache
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return [results[False], results[True]]


def markdown(rows):
    by_family = {}
    for r in rows:
        by_family.setdefault(r['family'], {})[r['grad_ckpt']] = r
    def peak(r):  # the activation peak, and on CUDA the total (weights and gradients included)
        return f"{r['peak_step_mib']:.0f}" + (f" (total {r['peak_total_mib']:.0f})" if 'peak_total_mib' in r else '')

    lines = ['| model | device | batch | amp | activation peak, no ckpt (MiB) | with --grad_ckpt (MiB) | saved | '
             'step time, no ckpt / ckpt (s) |', '|---|---|---|---|---|---|---|---|']
    for pair in by_family.values():
        off, on = pair[False], pair[True]
        saved = 1 - on['peak_step_mib'] / off['peak_step_mib']
        timing = (f"{off['step_s']:.2f} / {on['step_s']:.2f} ({on['step_s'] / off['step_s'] - 1:+.0%})"
                if off['step_s'] else '-')
        lines.append(f"| {off['model']} | {off['device']} | {off['batch']} | {off['amp']} | {peak(off)} | {peak(on)} "
                     f"| {saved:.0%} | {timing} |")
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', choices=['cpu', 'cuda'])
    p.add_argument('--quick', action='store_true', help='small batch (--batch_size), one timing repeat')
    p.add_argument('--batch_size', type=int, default=None,
                   help='for every family (default: 2 on CPU or with --quick, else the official per-GPU batch)')
    p.add_argument('--families', nargs='+', default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument('--amp', default=None, choices=['bf16', 'none'], help='default: bf16 on CUDA, none on CPU')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed steps per mode (default 1 with --quick, else 3; 0: memory only)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--json', default=None, help='append one JSON line per measurement to this file')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.amp or ('bf16' if device.type == 'cuda' else 'none')
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    rows = []
    for family in args.families:
        small = args.quick or device.type == 'cpu'
        batch = args.batch_size or (2 if small else FAMILIES[family][2])
        torch.manual_seed(0)
        for r in measure(family, device, batch, amp, repeats):
            r['torch'] = torch.__version__
            print(json.dumps(r), flush=True)
            rows.append(r)
            if args.json:
                with open(args.json, 'a') as f:
                    f.write(json.dumps(r) + '\n')
    print(markdown(rows))


if __name__ == '__main__':
    main()
