"""Does each method learn? Pretraining on Fashion-MNIST, scored on frozen features beside its baselines.

    python bench/learning.py --rows pixels localmim vit_random --seeds 0 1 2     # run (or finish) these rows
    python bench/learning.py --report                                            # table and plot only

Every row is a list of commands (pretraining, then eval_knn.py) printed before they run, so any row can be rerun
by hand. A command whose output exists is skipped and an interrupted pretraining resumes from its last checkpoint,
so the benchmark can run over several sittings. Runs go to --work; the results (docs/learning/results.json), the
table (between the markers of docs/learning/README.md) and the plot (docs/learning/accuracy_vs_time.png) are rewritten after
every row. Needs Debian's dataset-fashion-mnist and matplotlib.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from util.fashion_mnist import train_subset  # noqa: E402

DOCS = REPO / 'docs' / 'learning'
BEGIN, END = '<!-- learning:begin -->', '<!-- learning:end -->'  # docs/learning/README.md: the generated table
PER_CLASS = 1000        # training images per class: 10,000 in all (pretraining, k-NN neighbours, probe)
INPUT_SIZE = 64         # 28 px upsampled: a 4x4 grid of 16 px patches for the ViT
PRETRAIN = ('--model MIM_vit_tiny_patch16 --input_size {size} --batch_size 128 --epochs 5 --warmup_epochs 1 '
            '--blr 1.5e-3 --weight_decay 0.05 --num_workers 1 --device cpu --vis_freq 0')
EVAL = '--input_size {size} --nb_knn 20 --linear --num_workers 1 --device cpu'
# Published on the data set's page (github.com/zalandoresearch/fashion-mnist, README "Benchmark" and its
# scikit-learn benchmark site): supervised test accuracy with all 60,000 labelled training images.
PUBLISHED = [('Logistic regression on pixels (scikit-learn benchmark)', 84.2),
             ('MLP 256-128-100', 88.3), ('2 Conv + pooling (TensorFlow tutorial)', 91.6),
             ('ResNet-18 (with augmentation)', 94.9), ('WRN-28-10 (with augmentation)', 95.9)]


@dataclass
class Row:
    title: str
    pretrain_flags: str = None      # run_pretrain.py flags added to PRETRAIN; None: no pretraining
    encoder: str = 'pretrained'     # 'pretrained', 'random' (the localmim row's network at random weights), 'pixels'
    group: str = 'LocalMIM'
    notes: list = field(default_factory=list)


ROWS = {
    'pixels': Row('raw pixels (28 px, no encoder)', encoder='pixels', group='baseline'),
    'vit_random': Row('ViT-Tiny/16, random weights', encoder='random', group='baseline'),
    'localmim': Row('LocalMIM ViT-Tiny/16', ''),
    'freezeout_cubic': Row('FreezeOut cubic, t_0 0.8', '--how_scale cubic --t_0 0.8', group='FreezeOut'),
    'freezeout_linear': Row('FreezeOut linear, t_0 0.5', '--how_scale linear --t_0 0.5', group='FreezeOut'),
    'freezeout_cubic_cache': Row('FreezeOut cubic + --freeze_cache', '--how_scale cubic --t_0 0.8 --freeze_cache',
                                 group='FreezeOut'),
    'feature_masking_hog': Row('FreezeOut cubic + --feature_masking (hog)',
                               '--how_scale cubic --t_0 0.8 --feature_masking --feature_target hog',
                               group='FreezeOut'),
    'feature_masking_both': Row('FreezeOut cubic + --feature_masking (both)',
                                '--how_scale cubic --t_0 0.8 --feature_masking --feature_target both',
                                group='FreezeOut'),
}


def python(script, *args):
    return ['python', script, *args]  # run from the repository root with this interpreter (run_row)


def commands(name, seed, work, data):
    """[(what, argv, output that marks it done)] of one row and seed."""
    row, folder = ROWS[name], work / name / f'seed{seed}'
    evaluated = folder / 'eval.json'
    data_flag = ['--data_path', str(data)]
    if row.encoder == 'pixels':
        return [('eval', python('eval_knn.py', 'pixels', *data_flag, *shlex.split(EVAL.format(size=28)),
                                '--json', str(evaluated)), evaluated)]
    source = folder if row.encoder == 'pretrained' else work / 'localmim' / f'seed{seed}'
    checkpoint = source / 'pretrain' / 'checkpoint-last.pth'
    steps = []
    if row.encoder == 'pretrained':
        flags = shlex.split(PRETRAIN.format(size=INPUT_SIZE)) + shlex.split(row.pretrain_flags)
        steps.append(('pretrain', python('run_pretrain.py', *data_flag, *flags, '--seed', str(seed), '--output_dir',
                                         str(folder / 'pretrain'), '--log_dir', str(folder / 'pretrain')),
                      folder / 'pretrain' / 'done'))
    elif not checkpoint.is_file():
        raise SystemExit(f'row {name} uses the architecture of row localmim: run that row (seed {seed}) first')
    random = ['--random_init', '--seed', str(seed)] if row.encoder == 'random' else []
    steps.append(('eval', python('eval_knn.py', str(checkpoint), *data_flag, *shlex.split(EVAL.format(
        size=INPUT_SIZE)), *random, '--json', str(evaluated)), evaluated))
    return steps


def run_row(name, seed, work, data):
    for what, argv, done in commands(name, seed, work, data):
        print(f'[{time.strftime("%H:%M:%S")}] {name} seed {seed} {what}: {shlex.join(argv)}', flush=True)
        if done.exists():
            print('    already done', flush=True)
            continue
        done.parent.mkdir(parents=True, exist_ok=True)
        if what == 'pretrain':  # its console goes to a file: follow it with tail -f
            print(f'    console: {done.parent / "console.txt"}', flush=True)
            with open(done.parent / 'console.txt', 'a') as console:
                subprocess.run([sys.executable, *argv[1:]], check=True, stdout=console, stderr=subprocess.STDOUT)
        else:
            subprocess.run([sys.executable, *argv[1:]], check=True)
        if what == 'pretrain':
            done.write_text('')


def pretrain_seconds(folder):
    log = folder / 'pretrain' / 'log.txt'
    return sum(json.loads(line)['epoch_time'] for line in log.read_text().splitlines()) if log.exists() else None


def collect(work, data):
    """{row: {seed: {metrics}}} of every finished row and seed, with the commands that made it."""
    results = {}
    for name in ROWS:
        for folder in sorted((work / name).glob('seed*')):
            if not (folder / 'eval.json').exists():
                continue
            seed = int(folder.name[4:])
            entry = json.loads((folder / 'eval.json').read_text())
            entry['pretrain_seconds'] = pretrain_seconds(folder)
            entry['commands'] = [shlex.join(argv) for _, argv, _ in commands(name, seed, work, data)]
            results.setdefault(name, {})[seed] = entry
    return results


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(values, digits=1):
    mean, std = mean_std(values)
    if mean is None:
        return '-'
    return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if std is not None else '')


def table(results):
    lines = ['| row | seeds | 20-NN top-1 (%) | linear probe top-1 (%) | pretraining (min) | vs LocalMIM time |',
             '|---|---|---|---|---|---|']
    base_time = mean_std([r['pretrain_seconds'] for r in results.get('localmim', {}).values()])[0]
    for name, row in ROWS.items():
        runs = list(results.get(name, {}).values())
        if not runs:
            continue
        minutes = [r['pretrain_seconds'] / 60 if r['pretrain_seconds'] else None for r in runs]
        saving = '-'
        if base_time and row.group == 'FreezeOut':
            saving = f'{100 * (mean_std([r["pretrain_seconds"] for r in runs])[0] / base_time - 1):+.1f}%'
        lines.append(f'| {row.title} | {len(runs)} | {cell([r["knn_top1_k20"] for r in runs])} | '
                     f'{cell([r.get("linear_top1") for r in runs])} | {cell(minutes)} | {saving} |')
    lines += ['', '| published, supervised, 60,000 labels | test top-1 (%) |', '|---|---|']
    lines += [f'| {title} | {accuracy} |' for title, accuracy in PUBLISHED]
    return '\n'.join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in ROWS.items():
        runs = [r for r in results.get(name, {}).values() if r['pretrain_seconds']]
        if runs:
            axis.errorbar(statistics.mean(r['pretrain_seconds'] / 60 for r in runs),
                          statistics.mean(r['linear_top1'] for r in runs),
                          yerr=mean_std([r['linear_top1'] for r in runs])[1] or 0, fmt='o', capsize=3,
                          label=row.title)
    for name in ('pixels', 'vit_random'):
        if results.get(name):
            axis.axhline(statistics.mean(r['linear_top1'] for r in results[name].values()), ls='--', lw=1,
                         color='grey' if name == 'pixels' else 'black', label=ROWS[name].title)
    axis.set_xlabel('pretraining wall-clock on 2 CPU cores (min)')
    axis.set_ylabel('linear probe top-1 on the 10k test set (%)')
    axis.set_title('Fashion-MNIST, 10,000 training images')
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(work, data):
    results = collect(work, data)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / 'results.json').write_text(json.dumps(results, indent=1, sort_keys=True) + '\n')
    text = table(results)
    page = DOCS / 'README.md'
    before, rest = page.read_text().split(BEGIN)
    page.write_text(f'{before}{BEGIN}\n{text}\n{END}{rest.split(END)[1]}')
    if any(r.get('pretrain_seconds') for runs in results.values() for r in runs.values()):
        plot(results, DOCS / 'accuracy_vs_time.png')
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rows', nargs='+', default=[], choices=list(ROWS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--work', default='.cache/learning', help='where the runs go (relative: to the repository)')
    parser.add_argument('--report', action='store_true', help='only rebuild the table and plot')
    args = parser.parse_args()
    os.chdir(REPO)
    data, work = Path(os.path.relpath(train_subset(PER_CLASS), REPO)), Path(args.work)
    for name in [] if args.report else args.rows:
        for seed in args.seeds:
            run_row(name, seed, work, data)
            report(work, data)
    if args.report or not args.rows:
        report(work, data)


if __name__ == '__main__':
    os.environ.setdefault('PYTHONUNBUFFERED', '1')
    main()
