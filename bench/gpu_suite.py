"""One command that checks every CUDA path of the repository and measures its throughput, for a short GPU window.

    python bench/gpu_suite.py --out bench/results/H100.json              # full: about 8 minutes on one H100
    python bench/gpu_suite.py --out /tmp/q.json --quick                  # tiny sizes: about 2 minutes on a GPU
    python bench/gpu_suite.py --out /tmp/cpu.json --device cpu --quick   # on CPU (CUDA-only steps skipped)
    python bench/gpu_suite.py --out r.json --only scripts/localmim,fp16_inf
    python bench/results_table.py bench/results/H100.json --page docs/RESULTS.md   # the GPU tables of the docs

Every step runs in its own subprocess under its own time cap, so a failure or a hang costs that step only. A step
ends ok, failed (with the last lines of its output), timeout or skipped (with the reason). The correctness steps
(entry scripts, fp16 inf, SLaK routes, DDP) run --jobs at a time; the throughput steps run alone, one after the
other, so their numbers are not shared with anything. The JSON is rewritten after every step.

Steps: scripts/<case> (bench/suite_scripts.py: bf16 3 steps + stop/resume/compare, fp16, --compile), fp16_inf and
slak_routes (bench/suite_checks.py), speed/<case>[+compile] (bench/suite_speed.py), data and memory
(bench/bench_data.py and bench/bench_memory.py, when present), ddp/localmim and ddp/sce_syncbn (CUDA only:
torchrun, 2 processes over NCCL).
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from suite_scripts import CASES as SCRIPT_CASES  # noqa: E402
from suite_speed import CASES as SPEED_CASES  # noqa: E402

# time caps in seconds: (CUDA full, CUDA quick, CPU)
CAPS = {'scripts': (240, 150, 600), 'check': (120, 60, 300), 'speed': (150, 90, 400),
        'speed+compile': (240, 150, 400), 'external': (150, 90, 300), 'ddp': (180, 120, 300)}
COMPILED_SPEED = ('localmim', 'finetune')  # the others: see the reasons recorded by suite_speed.py
DDP_FLAGS = {
    'ddp/localmim': ('run_pretrain.py', '--data_path demo --model MIM_vit_tiny_patch16 --input_size 32 '
                     '--batch_size 8 --epochs 1 --warmup_epochs 0 --vis_freq 0 --num_workers 2 --print_freq 5 '
                     '--amp bf16', '--output_dir'),
    'ddp/sce_syncbn': ('main_sce.py', '--data_path demo --crop_size 32 --num_frames 4 --global_batch_size 8 '
                       '--queue_size 16 --epochs 1 --warmup_epochs 0 --num_workers 2 --print_freq 5 --vis_freq 0 '
                       '--sync_bn true --amp fp16', '--output_dir'),
}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def freezeout_ddp_command(args):
    """bench_freezeout.py over 2 GPUs (DDP, frozen parameters out of the all-reduce), or why it is skipped."""
    import torch
    if args.device != 'cuda' or torch.cuda.device_count() < 2:
        return 'needs 2 GPUs; on CPU: torchrun --nproc_per_node 2 bench/bench_freezeout.py (gloo), docs/FREEZEOUT.md'
    size = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '2'] if args.quick else \
        ['--batch_size', '128', '--amp', 'bf16']
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
            str(BENCH / 'bench_freezeout.py'), *size, '--feature_masking', '--warmup', '3', '--steps', '8',
            '--json', '{tmp}/result.jsonl']


def plan(args):
    """[(name, kind, command or skip reason, parallel)]: every step of the suite, in order."""
    py, dev = sys.executable, ['--device', args.device]
    quick = ['--quick'] if args.quick else []
    steps = []
    for case in SCRIPT_CASES:
        steps.append((f'scripts/{case}', 'scripts', [py, str(BENCH / 'suite_scripts.py'), case, *dev], True))
    for check in ('fp16_inf', 'slak_routes'):
        steps.append((check, 'check', [py, str(BENCH / 'suite_checks.py'), check, *dev, *quick], True))
    for name, (script, flags, out_flag) in DDP_FLAGS.items():
        if args.device != 'cuda':
            steps.append((name, 'ddp', 'CUDA only (NCCL); 2-process gloo launches: tests/test_launch_matrix.py', True))
        else:
            steps.append((name, 'ddp', [py, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                                        f'--master_port={free_port()}', str(BENCH / 'suite_scripts.py'), '--launch',
                                        script, *flags.split(), '--device', 'cuda', out_flag, '{tmp}/out'], True))
    steps.append(('ddp/freezeout', 'ddp', freezeout_ddp_command(args), False))
    for case in SPEED_CASES:
        steps.append((f'speed/{case}', 'speed', [py, str(BENCH / 'suite_speed.py'), case, *dev, *quick], False))
        if case in COMPILED_SPEED:
            name = f'speed/{case}+compile'
            if args.device != 'cuda':
                steps.append((name, 'speed+compile', 'torch.compile takes minutes on CPU; run on CUDA', False))
            else:
                steps.append((name, 'speed+compile', [py, str(BENCH / 'suite_speed.py'), case, *dev, *quick,
                                                      '--compile'], False))
    # on CPU the memory bench measures one family only, without timing (ViT-B at 224 px is ~30 s a step there)
    cpu_memory = ['--families', 'localmim', '--repeats', '0'] if args.device != 'cuda' else []
    for bench, extra in (('data', []), ('memory', cpu_memory)):
        path = BENCH / f'bench_{bench}.py'
        steps.append((bench, 'external', [py, str(path), '--quick', *dev, *extra, '--json', '{tmp}/result.jsonl']
                      if path.exists() else f'file missing: bench/{path.name}', False))
    if args.only:
        wanted = args.only.split(',')
        steps = [s for s in steps if any(s[0] == w or s[0].startswith(w + '/') for w in wanted)]
    return steps


def last_lines(text, n=25):
    return '\n'.join(text.strip().splitlines()[-n:])


def read_result(kind, tmp):
    """What the step's worker left behind: a dict, or None."""
    if kind == 'external' or kind == 'ddp':
        path = Path(tmp) / 'result.jsonl'
        if path.exists():
            return {'results': [json.loads(line) for line in path.read_text().splitlines() if line.strip()]}
        return None
    path = Path(tmp) / 'result.json'
    return json.loads(path.read_text()) if path.exists() else None


def run_step(step, args, env):
    name, kind, cmd, _ = step
    if isinstance(cmd, str):
        return {'name': name, 'kind': kind, 'status': 'skipped', 'reason': cmd}
    cap = CAPS[kind][2 if args.device != 'cuda' else 1 if args.quick else 0]
    tmp = tempfile.mkdtemp(prefix='gpu_suite_')
    cmd = [c.replace('{tmp}', tmp) for c in cmd]
    if kind in ('scripts', 'check', 'speed', 'speed+compile'):
        cmd += ['--result', str(Path(tmp) / 'result.json')]
    started = time.time()
    print(f'[suite] start {name} (cap {cap} s)', flush=True)
    try:
        # a new session: on timeout the whole process group (DataLoader workers, torchrun ranks) is killed
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=cap)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            timed_out = True
        res = {'name': name, 'kind': kind, 'seconds': round(time.time() - started, 1)}
        result = read_result(kind, tmp)
        if kind == 'scripts':
            res['checks'] = result or {}
            result = None
        elif result:
            res.update({k: v for k, v in result.items() if k != 'status'})
        if timed_out:
            res.update(status='timeout', error=f'no end within {cap} s\n' + last_lines(output))
        elif proc.returncode != 0:
            res.update(status='failed', returncode=proc.returncode, error=last_lines(output))
            refused = ('Duplicate GPU', 'ncclInvalidUsage', 'invalid device ordinal')
            if kind == 'ddp' and any(r in output for r in refused):
                line = next(x for x in reversed(output.splitlines()) if any(r in x for r in refused))
                res.update(status='skipped', reason=f'NCCL refuses 2 ranks on one GPU: {line.strip()[:200]}')
        elif kind == 'scripts':
            failed = [c for c, r in res['checks'].items() if r['status'] != 'ok' and r['status'] != 'skipped']
            res['status'] = 'failed' if failed or not res['checks'] else 'ok'
            if failed:
                res['error'] = '; '.join(f"{c}: {res['checks'][c].get('error', '')}" for c in failed)
        else:
            res['status'] = (result or {}).get('status', 'ok')
            if res['status'] == 'skipped':
                res['reason'] = result.get('reason')
        if kind == 'scripts' and timed_out:  # checks that never reported ran into the cap
            for check in ('bf16_resume', 'fp16', 'compile'):
                res['checks'].setdefault(check, {'status': 'timeout'})
        if args.keep_logs:
            res['log'] = last_lines(output, 200)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[suite] {res['status']:>7} {name} ({res.get('seconds', 0)} s) "
          f"{res.get('reason') or (res.get('error') or '').splitlines()[-1:] or ''}", flush=True)
    return res


def environment(device):
    import torch
    cuda = device == 'cuda' and torch.cuda.is_available()
    cpu = f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
    return {'device': device, 'device_name': torch.cuda.get_device_name(0) if cuda else cpu,
            'gpus': torch.cuda.device_count() if cuda else 0,
            'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(),
            'commit': subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='the JSON results file (e.g. bench/results/H100.json)')
    p.add_argument('--quick', action='store_true', help='tiny throughput sizes')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--only', default=None, help='comma list of step names or prefixes (scripts, speed, ...)')
    p.add_argument('--jobs', type=int, default=None, help='correctness steps at a time (default: 4 on CUDA, 2 on CPU)')
    p.add_argument('--keep_logs', action='store_true', help='keep the last 200 output lines of every step')
    args = p.parse_args()
    import torch
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            p.error('--device cuda: no CUDA device here (use --device cpu)')
    jobs = args.jobs or (4 if args.device == 'cuda' else 2)
    demo = Path(tempfile.mkdtemp(prefix='gpu_suite_demo_'))
    env = {**os.environ, 'DEMO_DATA_ROOT': str(demo / 'images'), 'PYTHONWARNINGS': 'ignore'}
    if args.device == 'cuda' and torch.cuda.device_count() < 2:
        env['SUITE_ONE_GPU'] = '1'  # the DDP steps put both ranks on GPU 0
    if args.device == 'cpu' and jobs > 1:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    # build the demo data once, before parallel steps would all build it
    subprocess.run([sys.executable, '-c', 'from util.data.demo_data import demo_imagefolder as a; from '
                    'util.video.demo import make_demo_videos as b; a(); b()'], cwd=REPO, env=env, check=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {'suite': 'quick' if args.quick else 'full', **environment(args.device),
              'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'steps': []}
    started = time.time()

    def save():
        report['seconds'] = round(time.time() - started, 1)
        tmp = out.with_suffix('.tmp')
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(out)

    steps = plan(args)
    try:
        parallel = [s for s in steps if s[3]]
        with ThreadPoolExecutor(jobs) as pool:
            for res in pool.map(lambda s: run_step(s, args, env), parallel):
                report['steps'].append(res)
                save()
        for step in (s for s in steps if not s[3]):
            report['steps'].append(run_step(step, args, env))
            save()
    finally:
        shutil.rmtree(demo, ignore_errors=True)
    counts = {}
    for s in report['steps']:
        counts[s['status']] = counts.get(s['status'], 0) + 1
    report['summary'] = counts
    save()
    print(f"[suite] {len(report['steps'])} steps in {report['seconds']:.0f} s: {counts}; wrote {out}")
    sys.exit(1 if counts.get('failed') or counts.get('timeout') else 0)


if __name__ == '__main__':
    main()
