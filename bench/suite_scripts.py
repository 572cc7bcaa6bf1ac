"""Entry-script checks of the GPU suite: each script trains a tiny model for 3 optimizer steps on the demo data.

    python bench/suite_scripts.py localmim --device cuda --result out.json      # one case, all its checks
    python bench/suite_scripts.py --launch run_pretrain.py --data_path demo ...   # run a script as its CLI does

A case runs its script's command line (`__main__`, as `python script.py` would) several times in this one process
(one interpreter start and CUDA context for all of them): bf16 3 steps; bf16 stopped after step 1 and rerun, which
resumes from the mid-epoch checkpoint and stops after step 3; fp16 (GradScaler) 3 steps; --compile 3 steps where
the script has the flag. "Stopped after step N" is SIGTERM sent right after optimizer step N, which every script
answers by saving a mid-epoch checkpoint and exiting with code 3, so every run ends with a checkpoint to compare.

On CPU the resume check runs in float32 (bf16 is emulated there and many times slower). Resumed vs
uninterrupted: bitwise on CPU. On CUDA some kernels (attention and scatter backward, cuDNN algorithm
choice) are not deterministic, so the resumed weights must be within RESUME_TOLERANCE of the uninterrupted ones,
measured as ||w_resumed - w_straight|| / ||w_straight - w_step1|| (the drift against how far steps 2-3 moved the
weights; a resume that loses the optimizer state, the RNG or the schedule drifts by tens of percent).
"""
import argparse
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import util.train_step  # noqa: E402  (patched below; the scripts use this very class)

RESUME_TOLERANCE = 0.05
STEPS = 3

# name: (script, flags; {out} is the output folder, {bs} the batch size, {amp} the precision)
IMAGES = '--data_path demo --num_workers {workers} --print_freq 1 --amp {amp}'
CASES = {
    'localmim': ('run_pretrain.py', f'{IMAGES} --model MIM_vit_tiny_patch16 --input_size 32 --batch_size {{bs}} '
                 '--epochs 2 --warmup_epochs 0 --vis_freq 0 --output_dir {out}'),
    # t_0 0.02 of one epoch (18 steps at batch 8, 72 at 2): unit 0 freezes after step 1 or 2, so the resumed run
    # meets the freeze event
    'freezeout': ('run_pretrain.py', f'{IMAGES} --model MIM_vit_tiny_patch16 --input_size 32 --batch_size {{bs}} '
                  '--epochs 1 --warmup_epochs 0 --vis_freq 0 --how_scale linear --t_0 0.02 --output_dir {out}'),
    'finetune': ('run_finetune.py', f'{IMAGES} --model vit_tiny_patch16 --input_size 32 --batch_size {{bs}} '
                 '--epochs 2 --warmup_epochs 0 --nb_classes 6 --aa none --reprob 0 --output_dir {out}'),
    'linprobe': ('run_finetune.py', f'{IMAGES} --model vit_tiny_patch16 --input_size 32 --batch_size {{bs}} '
                 '--epochs 2 --warmup_epochs 0 --nb_classes 6 --linprobe --cls_token --output_dir {out}'),
    'spark_resnet': ('main_spark.py', f'{IMAGES} --model resnet18 --input_size 64 --bs {{bs}} --ep 2 --wp_ep 0 '
                     '--vis_freq 0 --exp_name suite --exp_dir {out}'),
    'spark_convnext': ('main_spark.py', f'{IMAGES} --model convnext_atto --input_size 64 --bs {{bs}} --ep 2 --wp_ep 0 '
                       '--vis_freq 0 --exp_name suite --exp_dir {out}'),
    'slak_dense': ('main_slak.py', f'{IMAGES} --model SLaK_tiny --width_factor 0.25 --kernel_size 7 7 5 3 3 '
                   '--Decom True --input_size 32 --batch_size {bs} --epochs 2 --warmup_epochs 0 --nb_classes 6 '
                   '--aa none --reprob 0 --output_dir {out}'),
    # -u 1: prune and regrow after every step
    'slak_sparse': ('main_slak.py', f'{IMAGES} --model SLaK_tiny --width_factor 0.25 --kernel_size 7 7 5 3 3 '
                    '--Decom True --input_size 32 --batch_size {bs} --epochs 2 --warmup_epochs 0 --nb_classes 6 '
                    '--aa none --reprob 0 --sparse --sparsity 0.5 -u 1 --prune_rate 0.3 --output_dir {out}'),
    'sce': ('main_sce.py', '--data_path demo --num_workers {workers} --print_freq 1 --amp {amp} --crop_size 32 '
            '--num_frames 4 --global_batch_size {bs} --queue_size 16 --epochs 2 --warmup_epochs 0 --vis_freq 0 '
            '--output_dir {out}'),
}
RESUMABLE = {'main_spark.py': '{model}_still_pretraining.pth'}


def has_flag(script, flag):
    return f"'{flag}'" in (REPO / script).read_text()


# ---- running a script as its command line does

_stop_after = [None]  # SIGTERM this process right after this optimizer step number (trainer.num_updates)
_real_step = util.train_step.TrainStep.step


def _step_then_signal(self, hooks=()):
    _real_step(self, hooks)
    if self.num_updates == _stop_after[0]:
        os.kill(os.getpid(), signal.SIGTERM)


util.train_step.TrainStep.step = _step_then_signal


def run_script(script, argv, stop_after):
    """Runs `python script argv...` in this process; returns its exit code (0 when it returns)."""
    _stop_after[0] = stop_after
    saved = sys.argv
    sys.argv = [str(REPO / script), *argv]
    try:
        runpy.run_path(str(REPO / script), run_name='__main__')
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv, _stop_after[0] = saved, None


# ---- checkpoints

def checkpoint_path(script, out, argv):
    if script == 'main_spark.py':
        model = argv[argv.index('--model') + 1]
        return Path(out) / RESUMABLE[script].format(model=model)
    return Path(out) / 'checkpoint-last.pth'


def tensors(tree, prefix=''):
    """Flat {path: tensor} of every tensor in nested dicts / lists."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(tensors(v, f'{prefix}/{k}'))
    return out


def compared_state(ckpt):
    """What must match after a resume: weights, optimizer state, loss scale and method state (masks, EMA, queue)."""
    extra = {k: v for k, v in (ckpt.get('extra') or {}).items() if k != 'mid_epoch'}
    return tensors({'model': ckpt['model'], 'optimizer': ckpt['optimizer'].get('state', {}),
                    'scaler': ckpt.get('scaler') or {}, 'extra': extra})


def compare(straight, resumed, start):
    """Differences between the resumed and the uninterrupted run's final state; `start` is the checkpoint the
    resumed run started from (the drift is measured against how far the remaining steps moved the weights)."""
    a, b = compared_state(straight), compared_state(resumed)
    if a.keys() != b.keys():
        return {'equal': False, 'mismatched_keys': sorted(a.keys() ^ b.keys())[:5]}
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    res = {'equal': not differ, 'differing_tensors': len(differ), 'first_differing': differ[:3]}
    weights = [k for k in straight['model'] if straight['model'][k].is_floating_point()]
    drift = sum((resumed['model'][k].double() - straight['model'][k].double()).pow(2).sum() for k in weights)
    moved = sum((straight['model'][k].double() - start['model'][k].double()).pow(2).sum() for k in weights)
    res['max_abs_diff'] = max((float((resumed['model'][k].double() - straight['model'][k].double()).abs().max())
                               for k in weights), default=0.0)
    res['relative_drift'] = float(drift.sqrt() / moved.sqrt()) if moved > 0 else float(drift > 0)
    return res


def finite(ckpt):
    return all(torch.isfinite(t).all() for t in ckpt['model'].values() if t.is_floating_point())


# ---- one case

def three_steps(script, argv, out):
    """Runs 3 optimizer steps; returns (result dict, checkpoint)."""
    code = run_script(script, argv, STEPS)
    path = checkpoint_path(script, out, argv)
    if code != 3 or not path.exists():
        raise RuntimeError(f'expected a stop after step {STEPS} (exit code 3) and {path.name}, got exit code {code}')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if ckpt['step'] != STEPS or not finite(ckpt):
        raise RuntimeError(f"checkpoint at step {ckpt['step']}, finite weights: {finite(ckpt)}")
    res = {'step': ckpt['step'], 'frozen_units': (ckpt.get('extra') or {}).get('frozen_units')}
    if ckpt.get('scaler'):
        res['loss_scale'] = float(ckpt['scaler']['scale'])
    return {k: v for k, v in res.items() if v is not None}, ckpt


def check_case(name, device, workdir, record):
    script, flags = CASES[name]
    cuda = device == 'cuda'
    bs = 8 if cuda else 2  # bf16 is emulated on most CPUs: keep the CPU runs small

    def argv(variant, amp, *extra):
        out = workdir / f'{name}_{variant}'
        line = flags.format(out=out, bs=bs, amp=amp, workers=2 if cuda else 0)
        return line.split() + ['--device', device, *extra], out

    def sub(check, fn):
        started = time.time()
        try:
            record(check, {'status': 'ok', **fn(), 'seconds': round(time.time() - started, 1)})
        except Exception as error:  # one check failing must not hide the others
            record(check, {'status': 'failed', 'error': f'{type(error).__name__}: {error}'[-2000:],
                           'traceback': traceback.format_exc()[-3000:], 'seconds': round(time.time() - started, 1)})

    def resume_check():
        args_s, out_s = argv('straight', resume_amp)
        res, straight = three_steps(script, args_s, out_s)
        args_r, out_r = argv('resumed', resume_amp)
        code = run_script(script, args_r, 1)
        if code != 3:
            raise RuntimeError(f'the run to interrupt after step 1 ended with exit code {code}')
        first = torch.load(checkpoint_path(script, out_r, args_r), map_location='cpu', weights_only=True)
        _, resumed = three_steps(script, args_r, out_r)
        diff = compare(straight, resumed, first)
        diff['step_of_interrupt'] = first['step']
        bitwise = not cuda
        diff['held'] = diff['equal'] if bitwise else diff.get('relative_drift', 1.0) <= RESUME_TOLERANCE
        diff['criterion'] = 'bitwise' if bitwise else f'relative drift <= {RESUME_TOLERANCE}'
        if not diff['held']:
            raise RuntimeError(f'resumed run differs from the uninterrupted one: {diff}')
        return {**res, 'amp': resume_amp, 'resume': diff}

    # bf16 is emulated on most CPUs, many times slower than float32: there the resume runs in float32 (which the
    # tests also prove bitwise) and bf16 is left to CUDA
    resume_amp = 'bf16' if cuda else 'none'
    sub('bf16_resume', resume_check)
    def fp16_check():
        res = three_steps(script, *argv('fp16', 'fp16'))[0]
        if cuda and 'loss_scale' not in res:
            raise RuntimeError('the fp16 checkpoint holds no GradScaler state')
        return res
    if not cuda and script in ('main_spark.py', 'main_slak.py', 'main_sce.py'):
        record('fp16', {'status': 'skipped', 'reason': 'fp16 convolutions are emulated on CPU (minutes); the GradScaler '
                        'path is checked on CPU by fp16_inf and the ViT cases'})
    else:
        sub('fp16', fp16_check)
    if not has_flag(script, '--compile'):
        record('compile', {'status': 'skipped', 'reason': f'{script} has no --compile flag'})
    elif not cuda and os.environ.get('SUITE_CPU_COMPILE') != '1':
        record('compile', {'status': 'skipped', 'reason': 'torch.compile takes minutes on CPU; run on CUDA '
                           '(SUITE_CPU_COMPILE=1 forces it)'})
    else:
        a, out = argv('compile', 'bf16', '--compile')
        sub('compile', lambda: three_steps(script, a, out)[0])


def main():
    if sys.argv[1:2] == ['--launch']:  # --launch SCRIPT ARGS...: as `python SCRIPT ARGS...`
        if os.environ.get('SUITE_ONE_GPU') == '1':  # every rank on GPU 0 (NCCL may refuse: the suite says so)
            os.environ['LOCAL_RANK'] = '0'
        sys.exit(run_script(sys.argv[2], sys.argv[3:], None))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('case', choices=sorted(CASES))
    p.add_argument('--device', default='cuda')
    p.add_argument('--result', required=True, help='JSON file, rewritten after every check')
    args = p.parse_args()
    results = {}

    def record(check, res):
        results[check] = res
        print(f"[{args.case}] {check}: {res['status']} {res.get('reason') or res.get('error') or ''}", flush=True)
        Path(args.result).write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix=f'suite_{args.case}_') as workdir:
        check_case(args.case, args.device, Path(workdir), record)


if __name__ == '__main__':
    main()
