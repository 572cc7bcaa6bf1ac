"""Markdown tables from bench/gpu_suite.py results; with --page, written into the results page.

    python bench/results_table.py bench/results/H100.json                        # print the tables
    python bench/results_table.py bench/results/*.json --page docs/RESULTS.md    # replace the text between the markers

The GPU rows of docs/RESULTS.md are generated here, never typed: --page replaces everything between
`<!-- gpu-suite:begin -->` and `<!-- gpu-suite:end -->`.
"""
import argparse
import json
import sys
from pathlib import Path

BEGIN, END = '<!-- gpu-suite:begin -->', '<!-- gpu-suite:end -->'


def fmt(value, digits=1, scale=1.0, suffix=''):
    if value is None:
        return '-'
    return f'{value * scale:.{digits}f}{suffix}'


def check_cell(check):
    """One entry-script check: its status, and for the resume check how close the resumed run came."""
    if not check:
        return '-'
    status = check['status']
    if status == 'skipped':
        return f"skipped ({check.get('reason', '')})"
    resume = check.get('resume')
    if status == 'ok' and resume:
        return 'ok, bitwise' if resume['equal'] else f"ok, drift {resume['relative_drift']:.1e}"
    if status == 'ok' and 'loss_scale' in check:
        return f"ok, scale {check['loss_scale']:g}"
    return status


def step_note(step):
    if step['status'] == 'skipped':
        return step.get('reason', '')
    if step['status'] != 'ok':
        return (step.get('error') or '').strip().splitlines()[-1:][0][:120] if step.get('error') else ''
    if step['name'] == 'fp16_inf':
        return (f"inf step skipped: weights unchanged {step['weights_unchanged']}, skipped {step['skipped']}, "
                f"scale {step['scale_before']:g} -> {step['scale_after']:g}")
    if step['name'] == 'slak_routes':
        return (f"51x51 unit, {step['channels']} ch, {step['size']} px: worst relative error "
                f"{step['worst_relative_error']:.1e} (tolerance {step['tolerance']:.0e})")
    return ''


def correctness_table(report):
    lines = ['| entry script check | 3 steps, stopped + resumed vs straight (bf16; CPU: fp32) | fp16 (GradScaler) '
             '| --compile | seconds |', '|---|---|---|---|---|']
    for step in report['steps']:
        if step['kind'] != 'scripts':
            continue
        checks = step.get('checks', {})
        lines.append(f"| {step['name'].split('/', 1)[1]} | {check_cell(checks.get('bf16_resume'))} | "
                     f"{check_cell(checks.get('fp16'))} | {check_cell(checks.get('compile'))} | "
                     f"{fmt(step.get('seconds'), 0)} |")
    lines += ['', '| check | status | result |', '|---|---|---|']
    for step in report['steps']:
        if step['kind'] in ('check', 'ddp', 'external'):
            lines.append(f"| {step['name']} | {step['status']} | {step_note(step)} |")
    return lines


def speed_rows(step, device):
    """(what, batch, dtype, compile, images/s, ms/step, GFLOP/img, MFU, peak GiB) rows of one throughput step."""
    amp, compiled = step.get('amp', '-'), 'yes' if step['name'].endswith('+compile') else 'no'
    if 'depths' in step:
        for d in step['depths']:
            yield (f"{step['what']}, frozen depth {d['frozen']}", step['batch_size'], amp, compiled,
                   step['batch_size'] / d['s_per_step'], 1e3 * d['s_per_step'], d['gflop_per_image'], None, None)
    elif 'routes' in step:
        for route, r in step['routes'].items():
            yield (f"{step['what']}, route {route}", r['batch_size'], amp, compiled, r['images_per_s'],
                   r['ms_per_step'], r['gflop_per_image'], r['mfu'], r['peak_mem_gib'])
    else:
        yield (step['what'], step['batch_size'], amp, compiled, step['images_per_s'], step['ms_per_step'],
               step.get('gflop_per_image'), step.get('mfu'), step.get('peak_mem_gib'))


def speed_table(report):
    lines = ['| model | device | batch | dtype | compile | images/s | ms/step | GFLOP/img | MFU | peak memory |',
             '|---|---|---|---|---|---|---|---|---|---|']
    device = report['device_name']
    for step in report['steps']:
        if not step['kind'].startswith('speed'):
            continue
        if step['status'] != 'ok':
            lines.append(f"| {step['name']} | {device} | | | | {step['status']}: {step_note(step)} | | | | |")
            continue
        for what, batch, amp, compiled, ips, ms, gflop, mfu, mem in speed_rows(step, device):
            lines.append(f'| {what} | {device} | {batch} | {amp} | {compiled} | {fmt(ips)} | {fmt(ms)} | '
                         f'{fmt(gflop, 2)} | {fmt(mfu, 1, 100, "%")} | {fmt(mem, 1, suffix=" GiB")} |')
    return lines


def freezeout_table(report):
    """Whole-run saving of FreezeOut and its stores (README schedules, 100 epochs) from the measured seconds per step
    at every frozen depth, the FLOP model in brackets: speed/freezeout (1 process) and ddp/freezeout (2 GPUs)."""
    runs = []
    for step in report['steps']:
        if step['status'] == 'ok' and step['name'] == 'speed/freezeout':
            runs.append((step['what'], 1, step['stored_path_savings']))
        elif step['status'] == 'ok' and step['name'] == 'ddp/freezeout':
            runs += [(f"FreezeOut {r['model']}, {r['input_size']} px", r['world_size'], r['stored_path_savings'])
                     for r in step['results']]
    if not runs:
        return []
    variants = list(runs[0][2]['s']['sticky'][next(iter(runs[0][2]['s']['sticky']))])
    lines = ['| whole-run saving | processes | sampler | schedule | ' + ' | '.join(variants) + ' |',
             '|---|---|---|---|' + '---|' * len(variants)]
    for what, n, savings in runs:
        for sampler, by_schedule in savings['s'].items():
            for schedule, measured in by_schedule.items():
                flops = savings['flops'][sampler][schedule]
                lines.append(f'| {what} | {n} | {sampler} | {schedule} | ' +
                             ' | '.join(f'{measured[v]:.1%} ({flops[v]:.1%})' for v in variants) + ' |')
    return [''] + lines


def render(report):
    summary = ', '.join(f'{n} {status}' for status, n in sorted(report.get('summary', {}).items()))
    head = (f"`python bench/gpu_suite.py{' --quick' if report['suite'] == 'quick' else ''}` on "
            f"{report['device_name']} (torch {report['torch']}, commit {report['commit']}, "
            f"{report['started']}): {summary} in {report['seconds']:.0f} s.")
    return '\n'.join([head, '', *correctness_table(report), '', *speed_table(report), *freezeout_table(report)]) + '\n'


def replace_between_markers(text, body):
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f'the page has no {BEGIN} ... {END} block')
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + '\n' + body + text[end:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('results', nargs='+', help='JSON files written by bench/gpu_suite.py')
    p.add_argument('--page', '--readme', dest='page', default=None,
                   help='write the tables between the gpu-suite markers of this Markdown file (docs/RESULTS.md)')
    args = p.parse_args()
    body = '\n'.join(render(json.loads(Path(f).read_text())) for f in args.results)
    if args.page:
        path = Path(args.page)
        try:
            path.write_text(replace_between_markers(path.read_text(), body))
        except ValueError as error:
            sys.exit(f'results_table.py: error: {args.page}: {error}')
    else:
        sys.stdout.write(body)


if __name__ == '__main__':
    main()
