"""Throughput of one LocalMIM pretraining step (forward + backward + AdamW step), as the engine runs it.

The step goes through `util.train_step.TrainStep` (autocast, GradScaler for fp16, fused AdamW where the
device has it) on a synthetic batch that already lies on the device, so the loader is not measured.
On CUDA it also reports peak memory and the model-FLOPs utilisation (MFU): the FLOPs of one forward +
backward counted with `torch.utils.flop_counter.FlopCounterMode` (optimizer excluded), divided by the
step time and by the GPU's dense peak (bf16/fp16; TF32 = half of it for --amp none).

    # CPU, quick check (tiny model, small images)
    python bench/bench_pretrain.py --model MIM_vit_tiny_patch16 --batch_size 8 --input_size 64 --steps 2 --warmup 1
    # CPU, FLOPs per image of ViT-B/16 at 224 as well
    python bench/bench_pretrain.py --batch_size 4 --steps 2 --warmup 1 --count_flops
    # GPU (add --json results.jsonl to keep the result)
    python bench/bench_pretrain.py --batch_size 256 --amp bf16 --compile
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

import models  # noqa: E402,F401  (registers MIM_vit_*)
from util.train_step import TrainStep  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s, matched as substrings of the device name.
# NVL variants have lower clocks and are left out on purpose: pass --peak_tflops for them.
PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


# CPU attention kernels are missing from FlopCounterMode's table: count them with the formulas it uses
# for the CUDA kernels (forward: q @ k^T and p @ v; backward: recomputed q @ k^T + four gradient matmuls).
def _sdpa_fwd_flops(q, k, v, *_, out_shape=None, **__):
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def _sdpa_bwd_flops(grad_out, q, k, v, *_, out_shape=None, **__):
    return 2 * q[0] * q[1] * q[2] * k[2] * (3 * q[3] + 2 * v[3])


CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd_flops}


def step_parser(cpu_warmup, cpu_steps):
    """Flags of a timed LocalMIM training step, shared by the benchmarks; `finish_args` fills the defaults."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='MIM_vit_base_patch16')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default=None, help='default: bf16 on CUDA, none on CPU')
    p.add_argument('--compile', action='store_true', help='model.compile() in place (state-dict keys unchanged)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=None, help=f'untimed steps (default 5; CPU: {cpu_warmup})')
    p.add_argument('--steps', type=int, default=None, help=f'timed steps (default 20; CPU: {cpu_steps})')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--json', default=None, help='append the result to this file as one JSON line')
    p.set_defaults(cpu_warmup=cpu_warmup, cpu_steps=cpu_steps)
    return p


def finish_args(args):
    cuda = torch.device(args.device).type == 'cuda'
    args.amp = args.amp or ('bf16' if cuda else 'none')
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else args.cpu_warmup)
    args.steps = args.steps if args.steps is not None else (20 if cuda else args.cpu_steps)
    return args


def get_args():
    p = step_parser(cpu_warmup=1, cpu_steps=3)
    p.add_argument('--count_flops', action='store_true', help='count FLOPs also off CUDA')
    p.add_argument('--peak_tflops', type=float, default=None, help='peak of this device for the dtype used')
    return finish_args(p.parse_args())


def count_step_flops(model, trainer, imgs, mask_ratio):
    """FLOPs of one forward + backward (no optimizer step); the gradients are dropped afterwards."""
    mapping = CPU_SDPA_FLOPS if imgs.device.type == 'cpu' else None
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with trainer.autocast():
            loss, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_flops(device, amp, override_tflops):
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name and 'NVL' not in name), None)
    return None if peak is None else peak / (2 if amp == 'none' else 1)


def training_step(model, groups, args, device):
    """(TrainStep over AdamW, synthetic batch, closure running one optimizer step as the engine does)."""
    try:  # fused where the device has a fused AdamW kernel, as in training
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    trainer = TrainStep(model, optimizer, device, amp=args.amp)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)

    def step():
        with trainer.autocast():
            loss, _ = trainer.model(imgs, mask_ratio=args.mask_ratio)
        trainer.backward(loss)
        trainer.step()
    return trainer, imgs, step


def measure(args):
    """One benchmark run: (result dict, the one-line summary)."""
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    model = timm.create_model(args.model, img_size=args.input_size).to(device).train()
    trainer, imgs, step = training_step(model, param_groups_weight_decay(model, 0.05), args, device)
    flops = count_step_flops(model, trainer, imgs, args.mask_ratio) if cuda or args.count_flops else None
    if args.compile:
        model.compile()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps

    fp32 = 'tf32' if cuda and torch.get_float32_matmul_precision() != 'highest' else 'fp32'
    dtype = {'none': fp32}.get(args.amp, args.amp)  # MFU for none is against the TF32 peak either way
    res = {'model': args.model, 'device': torch.cuda.get_device_name(device) if cuda
           else f'cpu ({torch.get_num_threads()} threads)', 'batch_size': args.batch_size,
           'input_size': args.input_size, 'mask_ratio': args.mask_ratio, 'dtype': dtype, 'compile': args.compile,
           'fused_adamw': trainer.fused, 'images_per_s': args.batch_size / step_s, 'ms_per_step': step_s * 1e3,
           'warmup': args.warmup, 'steps': args.steps, 'torch': torch.__version__}
    line = (f"{args.model} | {res['device']} | batch {args.batch_size} | {args.input_size}px | {dtype} | "
            f"{'compiled' if args.compile else 'eager'} | {res['images_per_s']:.1f} img/s | {res['ms_per_step']:.1f} ms/step")
    if cuda:
        res['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        line += f" | peak mem {res['peak_mem_gib']:.2f} GiB"
    if flops is not None:
        res['gflop_per_image'] = flops / args.batch_size / 1e9
        line += f" | {res['gflop_per_image']:.2f} GFLOP/img (fwd+bwd)"
    if cuda:
        peak = peak_flops(device, args.amp, args.peak_tflops)
        res['peak_tflops'] = peak / 1e12 if peak else None
        res['mfu'] = flops / step_s / peak if peak else None
        line += f" | MFU {res['mfu']:.1%}" if peak else ' | MFU n/a (pass --peak_tflops)'
    return res, line


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res, line = measure(args)
    print(line)
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
    main()
