"""bench/gpu_suite.py runs every step to the end on CPU (CUDA-only steps skipped with a reason), its entry-script
checks hold (resumed == uninterrupted, bitwise on CPU; the injected inf step skipped), and bench/results_table.py
renders its JSON into the tables of docs/RESULTS.md."""
import json
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / 'bench'))
import results_table  # noqa: E402

REPORT = {
    'suite': 'full', 'device': 'cuda', 'device_name': 'NVIDIA H100 80GB HBM3', 'torch': '2.9.1', 'commit': 'abc1234',
    'started': '2026-01-02 03:04:05', 'seconds': 431.6, 'summary': {'ok': 4, 'skipped': 2},
    'steps': [
        {'name': 'scripts/localmim', 'kind': 'scripts', 'status': 'ok', 'seconds': 21.4, 'checks': {
            'bf16_resume': {'status': 'ok', 'step': 3, 'resume': {'equal': False, 'relative_drift': 0.00123}},
            'fp16': {'status': 'ok', 'step': 3, 'loss_scale': 65536.0},
            'compile': {'status': 'ok', 'step': 3}}},
        {'name': 'scripts/sce', 'kind': 'scripts', 'status': 'ok', 'seconds': 30.0, 'checks': {
            'bf16_resume': {'status': 'ok', 'resume': {'equal': True, 'relative_drift': 0.0}},
            'fp16': {'status': 'failed', 'error': 'RuntimeError: boom'},
            'compile': {'status': 'skipped', 'reason': 'main_sce.py has no --compile flag'}}},
        {'name': 'fp16_inf', 'kind': 'check', 'status': 'ok', 'weights_unchanged': True, 'skipped': 1,
         'scale_before': 65536.0, 'scale_after': 32768.0},
        {'name': 'ddp/localmim', 'kind': 'ddp', 'status': 'skipped', 'reason': 'CUDA only'},
        {'name': 'speed/localmim', 'kind': 'speed', 'status': 'ok', 'amp': 'bf16', 'what': 'LocalMIM ViT-B, 224 px',
         'batch_size': 256, 'images_per_s': 1234.56, 'ms_per_step': 207.37, 'gflop_per_image': 31.3, 'mfu': 0.391,
         'peak_mem_gib': 41.26},
        {'name': 'speed/freezeout', 'kind': 'speed', 'status': 'ok', 'amp': 'bf16', 'what': 'FreezeOut ViT-B',
         'batch_size': 128, 'depths': [{'frozen': 0, 's_per_step': 0.1, 'gflop_per_image': 31.3}],
         'stored_path_savings': {
             's': {'sticky': {'cubic_t0_0.8': {'freezeout': 0.12, 'exact_cache': 0.2, 'feature_masking': 0.19}}},
             'flops': {'sticky': {'cubic_t0_0.8': {'freezeout': 0.157, 'exact_cache': 0.214,
                                                   'feature_masking': 0.21}}}}},
        {'name': 'ddp/freezeout', 'kind': 'ddp', 'status': 'skipped', 'reason': 'needs 2 GPUs'},
        {'name': 'speed/sce+compile', 'kind': 'speed+compile', 'status': 'timeout', 'error': 'no end\nlast line'},
    ]}

EXPECTED = """\
`python bench/gpu_suite.py` on NVIDIA H100 80GB HBM3 (torch 2.9.1, commit abc1234, 2026-01-02 03:04:05): 4 ok, \
2 skipped in 432 s.

| entry script check | 3 steps, stopped + resumed vs straight (bf16; CPU: fp32) | fp16 (GradScaler) | --compile \
| seconds |
|---|---|---|---|---|
| localmim | ok, drift 1.2e-03 | ok, scale 65536 | ok | 21 |
| sce | ok, bitwise | failed | skipped (main_sce.py has no --compile flag) | 30 |

| check | status | result |
|---|---|---|
| fp16_inf | ok | inf step skipped: weights unchanged True, skipped 1, scale 65536 -> 32768 |
| ddp/localmim | skipped | CUDA only |
| ddp/freezeout | skipped | needs 2 GPUs |

| model | device | batch | dtype | compile | images/s | ms/step | GFLOP/img | MFU | peak memory |
|---|---|---|---|---|---|---|---|---|---|
| LocalMIM ViT-B, 224 px | NVIDIA H100 80GB HBM3 | 256 | bf16 | no | 1234.6 | 207.4 | 31.30 | 39.1% | 41.3 GiB |
| FreezeOut ViT-B, frozen depth 0 | NVIDIA H100 80GB HBM3 | 128 | bf16 | no | 1280.0 | 100.0 | 31.30 | - | - |
| speed/sce+compile | NVIDIA H100 80GB HBM3 | | | | timeout: last line | | | | |

| whole-run saving | processes | sampler | schedule | freezeout | exact_cache | feature_masking |
|---|---|---|---|---|---|---|
| FreezeOut ViT-B | 1 | sticky | cubic_t0_0.8 | 12.0% (15.7%) | 20.0% (21.4%) | 19.0% (21.0%) |
"""


def test_results_table_renders_the_readme_format():
    assert results_table.render(REPORT) == EXPECTED


def test_results_table_replaces_only_the_marked_block(tmp_path):
    (tmp_path / 'r.json').write_text(json.dumps(REPORT))
    readme = tmp_path / 'README.md'
    readme.write_text(f'# T\n\nbefore\n{results_table.BEGIN}\nold rows\n{results_table.END}\nafter\n')
    subprocess.run([sys.executable, str(REPO / 'bench' / 'results_table.py'), str(tmp_path / 'r.json'), '--page',
                    str(readme)], check=True)
    assert readme.read_text() == (f'# T\n\nbefore\n{results_table.BEGIN}\n{EXPECTED}{results_table.END}\nafter\n')


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cpu_quick_suite_runs_every_step_and_its_checks_hold(tmp_path):
    out = tmp_path / 'cpu.json'
    done = subprocess.run([sys.executable, 'bench/gpu_suite.py', '--device', 'cpu', '--quick', '--out', str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1700, check=False)
    report = json.loads(out.read_text())
    steps = {s['name']: s for s in report['steps']}
    bad = {n: s for n, s in steps.items() if s['status'] not in ('ok', 'skipped')}
    assert not bad and done.returncode == 0, (done.stdout[-3000:], bad)
    cases = ('localmim', 'freezeout', 'finetune', 'linprobe', 'spark_resnet', 'spark_convnext', 'slak_dense',
             'slak_sparse', 'sce')
    for case in cases:
        checks = steps[f'scripts/{case}']['checks']
        assert checks['bf16_resume']['status'] == 'ok', (case, checks)
        resume = checks['bf16_resume']['resume']
        assert resume['held'] and resume['equal'] and resume['criterion'] == 'bitwise', (case, resume)
        if case.startswith(('spark', 'slak', 'sce')):  # fp16 convolutions are emulated on CPU: left to CUDA
            assert checks['fp16']['status'] == 'skipped' and checks['fp16']['reason'], case
        else:
            assert checks['fp16']['status'] == 'ok' and checks['fp16']['loss_scale'] > 0, (case, checks['fp16'])
        assert checks['compile']['status'] == 'skipped' and checks['compile']['reason'], case
    assert steps['scripts/freezeout']['checks']['bf16_resume']['frozen_units'] > 0  # the resumed run froze a unit
    inf = steps['fp16_inf']
    assert inf['status'] == 'ok' and inf['weights_unchanged'] and inf['skipped'] == 1
    assert inf['scale_after'] == inf['scale_before'] / 2
    assert steps['slak_routes']['status'] == 'ok'
    assert steps['slak_routes']['worst_relative_error'] <= steps['slak_routes']['tolerance']
    for name in ('ddp/localmim', 'ddp/sce_syncbn', 'ddp/freezeout', 'speed/localmim+compile',
                 'speed/finetune+compile'):
        assert steps[name]['status'] == 'skipped' and steps[name]['reason'], name
    for name in ('speed/localmim', 'speed/freezeout', 'speed/finetune', 'speed/spark_resnet', 'speed/slak',
                 'speed/sce'):
        assert steps[name]['status'] == 'ok', steps[name]
    table = subprocess.run([sys.executable, 'bench/results_table.py', str(out)], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert '| localmim | ok, bitwise | ok, scale' in table and '| fp16_inf | ok |' in table
    assert '| FreezeOut MIM_vit_tiny_patch16, 32 px | 1 | sticky | cubic_t0_0.8 |' in table
