"""Does each method learn? Pretraining on Fashion-MNIST, scored on frozen features beside its baselines.

    python bench/learning.py --rows pixels localmim vit_random --seeds 0 1 2     # run (or finish) these rows
    python bench/learning.py --report                                            # table and plot only

Every row is a list of commands printed before they run, so any row can be rerun by hand: pretraining
(run_pretrain.py, or main_spark.py for the SparK rows), then eval_knn.py (frozen features), run_finetune.py
(fine-tuning rows), main_slak.py (SLaK, trained with labels) or main_sce.py then run_finetune_video.py (SCE on
Fashion-MNIST clips). A command whose output exists is skipped and an interrupted pretraining resumes from its last
checkpoint, and a row and seed already in results.json is not run again, so the benchmark can run over several
sittings. Runs go to --work; the results (docs/learning/results.json), the table (between the markers of docs/learning/README.md) and the
plot (docs/learning/accuracy_vs_time.png) are rewritten after every row. Needs Debian's dataset-fashion-mnist and
matplotlib.
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
from bench.freezeout_scaling import run_savings  # noqa: E402
from util.data.fashion_mnist import train_subset  # noqa: E402
from util.video.fashion_mnist import fashion_mnist_clips  # noqa: E402

DOCS = REPO / 'docs' / 'learning'
BEGIN, END = '<!-- learning:begin -->', '<!-- learning:end -->'  # docs/learning/README.md: the generated table
PER_CLASS = 1000        # training images per class: 10,000 in all (pretraining, k-NN neighbours, probe)
INPUT_SIZE = 64         # 28 px upsampled: a 4x4 grid of 16 px patches for the ViT
PRETRAIN = ('--model MIM_vit_tiny_patch16 --input_size {size} --batch_size {batch} --epochs 5 --warmup_epochs 1 '
            '--blr 1.5e-3 --weight_decay 0.05 --num_workers 1 --device cpu --vis_freq 0')
# FLOPs of the FreezeOut rows: bench/bench_freezeout.py counts one step's FLOPs at every frozen depth (the stored-path
# variants too) and sums them over the schedule of these 5 epochs of 78 steps (the count does not depend on the batch).
FLOPS = ('--model MIM_vit_tiny_patch16 --input_size {size} --batch_size 16 --epochs 5 --warmup_epochs 1 '
         '--steps_per_epoch 78 --feature_masking --rounds 1 --steps 1 --warmup 1 --threads 1')
EVAL = '--input_size {size} --nb_knn 20 --linear --num_workers 1 --device cpu'
# Fine-tuning (run_finetune.py, MAE's recipe: AdamW, layer decay 0.75, drop path 0.1, RandAugment, label smoothing
# 0.1, random erasing 0.25) of the localmim row's encoder, or of the same ViT from timm's initial weights without
# layer decay (MAE's from-scratch recipe has none). Both label budgets take about 400 steps; evaluated once, at the end.
FINETUNE = ('--model {model} --input_size {size} --nb_classes 10 --warmup_epochs 1 --num_workers 1 --device cpu '
            '--print_freq 50')
# SparK (main_spark.py) on the same 10,000 images at 32 px: models/spark_custom_cnn.py's your_convnet_32px (widths
# 32-128, total stride 8, so the mask covers 60% of a 4x4 grid of 8-px patches) with a 64-wide decoder (the official
# 768 would cost ten times the encoder). A LAMB step moves each weight by about lr times its norm, so the official
# lr rule (base_lr 2e-4 x batch / 256 = 1e-4) moves a weight by at most 12% in 1,170 steps (even at 5.7e-4, the
# spark_sqrtlr row, the loss only falls from 0.99 to 0.77): the spark rows use the official ResNet lr at batch 4096,
# 3.2e-3 (base_lr 6.4e-3 at batch 128). Its encoder is fine-tuned and scored as the LocalMIM ViT's.
SPARK_MODEL, SPARK_SIZE = 'your_convnet_32px', 32
# With LAMB's beta2 at 0 (BETA2_0, the official setting for custom models) that lr spiked at batch 128 (a 45-epoch
# run's loss rose from 0.51 to 4 at epoch 12), and so did the official lr scaled to batch 128 by the square root of
# the batch ratio, as LAMB's authors scale it: 3.2e-3 x sqrt(128 / 4096) = 5.7e-4 (base_lr 1.13e-3). At beta2 0.95
# (main_spark.py's default now) 3.2e-3 trains smoothly.
SPARK_SQRT_BASE_LR = 1.13e-3
BETA2_0 = '--ada 1e-9'  # LAMB's beta2 as good as 0 (--ada 0 means the model's default)
SPARK = (f'--model {SPARK_MODEL} --input_size {SPARK_SIZE} --dec_width 64 --bs 128 --ep 15 --wp_ep 1 --base_lr 6.4e-3 '
         '--num_workers 1 --device cpu --vis_freq 0 --print_freq 20')
# SLaK trained with labels (main_slak.py, the official ConvNeXt recipe without Mixup/CutMix, which would hide the
# difference on 1,000 images): a quarter-width SLaK-T at 32 px, whose stage maps are 8, 4, 2, 1: 7x7 kernels
# (decomposed into 7x3 + 3x7 as the paper's 51x5 + 5x51) span the first maps as 51x51 spans ImageNet's 56x56.
SLAK_PER_CLASS = 100
SLAK = ('--model SLaK_tiny --width_factor 0.25 --kernel_size 7 7 7 3 3 --Decom True --input_size 32 --batch_size 64 '
        '--nb_classes 10 --epochs 20 --warmup_epochs 2 --mixup 0 --cutmix 0 --num_workers 1 --device cpu '
        '--eval_freq 1000 --print_freq 50')
# SCE on Fashion-MNIST clips (util/video/fashion_mnist.fashion_mnist_clips: each clip one garment moving and zooming
# across 32 frames, labelled with its class), 30 per class and split: main_sce.py pretrains the R3D-18 on 4-frame
# clips at 32 px, run_finetune_video.py scores its trunk (or the same trunk at random weights) with the linear
# protocol (Kinetics-style train/val lists) and with retrieval (val clips as queries, train clips as the bank).
SCE_PER_CLASS = 30
SCE_CLIPS = '--num_frames 4 --clip_duration 1.0 --device cpu --num_workers 1'
SCE_PRETRAIN = ('--crop_size 32 --global_batch_size 32 --queue_size 256 --epochs 10 --warmup_epochs 1 --amp none '
                '--print_freq 5 --vis_freq 0')
SCE_EVAL = ('--dataset kinetics --train_crop_size 32 --train_short_side 32 40 --eval_crop_size 32 --num_clips 2 '
            '--num_crops 1')
SCE_PROTOCOLS = {'linear': '--protocol linear --epochs 10 --warmup_epochs 1 --batch_size 32 --eval_freq 1000',
                 'retrieval': '--protocol retrieval'}
# MAE's rule lr = blr x batch / 256 gives 7.8e-5 at batch 20: 400 steps of it left the 1% runs near chance (31%),
# so the 1% rows set lr 1e-3 (blr 1.28e-2; MAE fine-tunes ViT-B at 2e-3), for both encoders.
LABELS = {100: ('--batch_size 128 --epochs 5', PER_CLASS),
          1: ('--batch_size 20 --epochs 80 --blr 1.28e-2', PER_CLASS // 100)}
# MAE's linear probe (main_linprobe.py defaults but batch 64, 10 epochs) on the mean patch token, as eval_knn.py's
LINPROBE = '--linprobe --global_pool --batch_size 64 --epochs 10 --weight_decay 0'
# Published on the data set's page (github.com/zalandoresearch/fashion-mnist, README "Benchmark" and its
# scikit-learn benchmark site): supervised test accuracy with all 60,000 labelled training images.
PUBLISHED = [('Logistic regression on pixels (scikit-learn benchmark)', 84.2),
             ('MLP 256-128-100', 88.3), ('2 Conv + pooling (TensorFlow tutorial)', 91.6),
             ('ResNet-18 (with augmentation)', 94.9), ('WRN-28-10 (with augmentation)', 95.9)]


@dataclass
class Encoder:
    row: str            # the row that pretrains it
    checkpoint: str     # the file of that row's pretrain/ folder the other rows read
    model: str          # its timm name for run_finetune.py
    size: int           # input size


# The pretrained encoders of the SparK rows and of every other image row.
ENCODERS = {'LocalMIM': Encoder('localmim', 'checkpoint-last.pth', 'vit_tiny_patch16', INPUT_SIZE),
            'SparK': Encoder('spark_beta2', f'{SPARK_MODEL}_still_pretraining.pth', SPARK_MODEL, SPARK_SIZE)}


@dataclass
class Row:
    title: str
    pretrain_flags: str = None      # flags added to its pretraining command (PRETRAIN, or SPARK for the SparK group)
    encoder: str = 'pretrained'     # 'pretrained', 'random' (the localmim row's network at random weights), 'pixels'
    labels: int = None              # fine-tuning rows: percent of the training labels (None: frozen-feature scores)
    slak_flags: str = None          # SLaK rows: main_slak.py flags added to SLAK
    flops: tuple = None             # FreezeOut rows: (schedule, variant, feature target) in bench_freezeout's JSON
    timed: bool = True              # False: its pretraining shared the cores, its wall-clock is not reported
    source: str = None              # the row whose pretrained encoder it reads (None: its group's encoder row)
    finetune_flags: str = None      # fine-tuning rows: run_finetune.py flags instead of LABELS' batch and epochs
    group: str = 'LocalMIM'
    processes: int = 1              # pretraining processes (torchrun, gloo), the batch of 128 split between them
    notes: list = field(default_factory=list)


ROWS = {
    'pixels': Row('raw pixels (28 px, no encoder)', encoder='pixels', group='baseline'),
    'vit_random': Row('ViT-Tiny/16, random weights', encoder='random', group='baseline'),
    'localmim': Row('LocalMIM ViT-Tiny/16', ''),
    'localmim_20ep': Row('LocalMIM ViT-Tiny/16, 20 epochs', '--epochs 20 --save_freq 5', timed=False),
    'freezeout_cubic': Row('FreezeOut cubic, t_0 0.8', '--how_scale cubic --t_0 0.8', group='FreezeOut',
                           flops=('cubic_t0_0.8', 'freezeout', 'hog')),
    'freezeout_linear': Row('FreezeOut linear, t_0 0.5', '--how_scale linear --t_0 0.5', group='FreezeOut',
                            flops=('linear_t0_0.5', 'freezeout', 'hog')),
    'freezeout_cubic_cache': Row('FreezeOut cubic + --freeze_cache', '--how_scale cubic --t_0 0.8 --freeze_cache',
                                 group='FreezeOut', flops=('cubic_t0_0.8', 'exact_cache', 'hog')),
    'feature_masking_hog': Row('FreezeOut cubic + --feature_masking (hog)',
                               '--how_scale cubic --t_0 0.8 --feature_masking --feature_target hog',
                               group='FreezeOut', flops=('cubic_t0_0.8', 'feature_masking', 'hog')),
    'feature_masking_features': Row('FreezeOut cubic + --feature_masking (features)',
                                    '--how_scale cubic --t_0 0.8 --feature_masking --feature_target features',
                                    group='FreezeOut', flops=('cubic_t0_0.8', 'feature_masking', 'features')),
    'feature_masking_both': Row('FreezeOut cubic + --feature_masking (both)',
                                '--how_scale cubic --t_0 0.8 --feature_masking --feature_target both',
                                group='FreezeOut', flops=('cubic_t0_0.8', 'feature_masking', 'both')),
    # Under DDP each process stores its own prefixes: the rank-sticky sampler (--sampler auto with a store) keeps each
    # sample on one rank so they hit; the standard sampler deals samples to another rank every epoch.
    'cache_2proc_sticky': Row('FreezeOut cubic + --freeze_cache, 2 processes, rank-sticky sampler',
                              '--how_scale cubic --t_0 0.8 --freeze_cache --sampler rank_sticky', group='FreezeOut',
                              processes=2, timed=False),
    'cache_2proc_standard': Row('FreezeOut cubic + --freeze_cache, 2 processes, standard sampler',
                                '--how_scale cubic --t_0 0.8 --freeze_cache --sampler standard', group='FreezeOut',
                                processes=2, timed=False),
    'slak_dense': Row('SLaK-T/4, dense', slak_flags='', group='SLaK'),
    'slak_sparse': Row('SLaK-T/4, 40% sparse (dynamic sparse training)', slak_flags='--sparse --sparsity 0.4',
                       group='SLaK'),
    # the paper spends the saved weights on width: SLaK-T 1.3x wide at 40% sparsity (1.3 x the quarter width)
    'slak_sparse_wide': Row('SLaK-T/4 1.3x wide, 40% sparse (dynamic sparse training)',
                            slak_flags='--sparse --sparsity 0.4 --width_factor 0.325', group='SLaK'),
    'sce': Row('SCE R3D-18', group='SCE'),
    'sce_random': Row('R3D-18, random weights', encoder='random', group='SCE'),
    # The first SparK rows ran with LAMB beta2 0: the official --ada 0 gives beta2 0.95 to ResNets and 0.999 to
    # ConvNeXts but leaves other models at 0, so LAMB divided each step by the current gradient's magnitude alone and
    # the loss spiked. main_spark.py's --ada 0 now gives the custom CNN 0.95 too; --ada 1e-9 reruns the old rows.
    'spark': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0', BETA2_0, group='SparK'),
    'spark_sqrtlr': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, lr 5.7e-4 (square-root scaling)',
                        f'{BETA2_0} --base_lr {SPARK_SQRT_BASE_LR}', group='SparK'),
    'spark_45ep': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, lr 1.6e-3, 45 epochs', f'{BETA2_0} --base_lr 3.2e-3 --ep 45',
                      group='SparK', timed=False),
    'spark_beta2': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0.95', '--ada 0.95', group='SparK', timed=False),
    'spark_random': Row(f'{SPARK_MODEL}, random weights', encoder='random', group='SparK'),
    'finetune_1': Row('LocalMIM ViT-Tiny/16, fine-tuned', labels=1),
    'scratch_1': Row('ViT-Tiny/16 from scratch', encoder='random', labels=1),
    'finetune_100': Row('LocalMIM ViT-Tiny/16, fine-tuned', labels=100),
    'scratch_100': Row('ViT-Tiny/16 from scratch', encoder='random', labels=100),
    # run_finetune.py --linprobe at a batch a single GPU holds: MAE's LARS recipe, and AdamW at lr 1e-3 (blr 4e-3)
    'linprobe_lars': Row('LocalMIM ViT-Tiny/16, run_finetune.py --linprobe (LARS, blr 0.1, batch 64)', labels=100,
                         finetune_flags=LINPROBE + ' --blr 0.1'),
    'linprobe_adamw': Row('LocalMIM ViT-Tiny/16, run_finetune.py --linprobe --opt adamw (lr 1e-3, batch 64)',
                          labels=100, finetune_flags=LINPROBE + ' --opt adamw --blr 4e-3'),
    'spark_beta2_finetune_1': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0.95, fine-tuned', labels=1, group='SparK',
                                  source='spark_beta2'),
    'spark_beta2_finetune_100': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0.95, fine-tuned', labels=100, group='SparK',
                                    source='spark_beta2'),
    'spark_finetune_1': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, fine-tuned', labels=1, group='SparK',
                           source='spark'),
    'spark_scratch_1': Row(f'{SPARK_MODEL} from scratch', encoder='random', labels=1, group='SparK'),
    'spark_finetune_100': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, fine-tuned', labels=100, group='SparK',
                             source='spark'),
    'spark_scratch_100': Row(f'{SPARK_MODEL} from scratch', encoder='random', labels=100, group='SparK'),
    'spark_sqrtlr_finetune_1': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, lr 5.7e-4, fine-tuned', labels=1, group='SparK',
                                   source='spark_sqrtlr'),
    'spark_45ep_finetune_1': Row(f'SparK {SPARK_MODEL}, LAMB beta2 0, lr 1.6e-3, 45 epochs, fine-tuned', labels=1,
                                 group='SparK', source='spark_45ep'),
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
    encoder = ENCODERS['SparK' if row.group == 'SparK' else 'LocalMIM']
    source = folder if row.encoder == 'pretrained' and row.labels is None else \
        work / (row.source or encoder.row) / f'seed{seed}'
    checkpoint = source / 'pretrain' / encoder.checkpoint
    if row.labels is not None:
        return [finetune_command(row, seed, folder, checkpoint, encoder)]
    if row.group == 'SCE':
        return sce_commands(row, seed, folder, work / 'sce' / f'seed{seed}')
    if row.slak_flags is not None:
        data = Path(os.path.relpath(train_subset(SLAK_PER_CLASS), REPO))
        return [('train', python('main_slak.py', '--data_path', str(data), *shlex.split(SLAK + ' ' + row.slak_flags),
                                 '--seed', str(seed), '--output_dir', str(folder), '--log_dir', str(folder)),
                 folder / 'done')]
    steps = []
    if row.flops:
        flops = work / f'flops_{row.flops[2]}.json'
        steps.append(('flops', python('bench/bench_freezeout.py', *shlex.split(FLOPS.format(size=INPUT_SIZE)),
                                      '--feature_target', row.flops[2], '--json', str(flops)), flops))
    if row.encoder == 'pretrained' and row.group == 'SparK':
        flags = shlex.split(SPARK) + shlex.split(row.pretrain_flags or '')
        steps.append(('pretrain', python('main_spark.py', *data_flag, *flags, '--seed', str(seed),
                                         '--exp_name', name, '--exp_dir', str(folder / 'pretrain')),
                      folder / 'pretrain' / 'done'))
    elif row.encoder == 'pretrained':
        flags = shlex.split(PRETRAIN.format(size=INPUT_SIZE, batch=128 // row.processes)) + \
            shlex.split(row.pretrain_flags)
        launch = [] if row.processes == 1 else \
            ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(row.processes)]
        steps.append(('pretrain', python(*launch, 'run_pretrain.py', *data_flag, *flags, '--seed', str(seed),
                                         '--output_dir', str(folder / 'pretrain'), '--log_dir', str(folder / 'pretrain')),
                      folder / 'pretrain' / 'done'))
    elif not checkpoint.is_file():
        raise SystemExit(f'row {name} uses the architecture of row {source.parent.name}: run that row (seed {seed}) '
                         f'first')
    random = ['--random_init', '--seed', str(seed)] if row.encoder == 'random' else []
    for pool, done in (([], evaluated), (['--pool', 'grid', '--grid', '2'], folder / 'eval_grid.json')):
        steps.append(('eval', python('eval_knn.py', str(checkpoint), *data_flag, *shlex.split(EVAL.format(
            size=encoder.size)), *pool, *random, '--json', str(done)), done))
    return steps


def sce_commands(row, seed, folder, pretrained):
    data = ['--data_path', os.path.relpath(fashion_mnist_clips(SCE_PER_CLASS), REPO)]
    clips, seeded = shlex.split(SCE_CLIPS), ['--seed', str(seed)]
    steps = []
    if row.encoder == 'pretrained':
        steps.append(('pretrain', python('main_sce.py', *data, *clips, *shlex.split(SCE_PRETRAIN), *seeded,
                                         '--output_dir', str(folder / 'pretrain')), folder / 'pretrain' / 'done'))
    trunk = str(pretrained / 'pretrain' / 'checkpoint-last.pth') if row.encoder == 'pretrained' else ''
    for protocol, flags in SCE_PROTOCOLS.items():
        steps.append((protocol, python('run_finetune_video.py', *data, *clips, *shlex.split(SCE_EVAL),
                                       *shlex.split(flags), '--finetune', trunk, *seeded, '--output_dir',
                                       str(folder / protocol)), folder / protocol / 'done'))
    return steps


def finetune_command(row, seed, folder, checkpoint, encoder):
    batch_and_epochs, per_class = LABELS[row.labels]
    if row.encoder == 'pretrained' and not checkpoint.is_file():
        raise SystemExit(f'fine-tuning starts from row {row.source or encoder.row}: run that row (seed {seed}) first')
    start = ['--finetune', str(checkpoint)] if row.encoder == 'pretrained' else ['--layer_decay', '1.0']
    data = Path(os.path.relpath(train_subset(per_class), REPO))
    flags = shlex.split(FINETUNE.format(model=encoder.model, size=encoder.size)) + \
        shlex.split(row.finetune_flags or batch_and_epochs)
    argv = python('run_finetune.py', '--data_path', str(data), *flags, *start, '--eval_freq', '1000', '--seed',
                  str(seed), '--output_dir', str(folder), '--log_dir', str(folder))
    return 'finetune', argv, folder / 'done'


def run_row(name, seed, work, data):
    for what, argv, done in commands(name, seed, work, data):
        print(f'[{time.strftime("%H:%M:%S")}] {name} seed {seed} {what}: {shlex.join(argv)}', flush=True)
        if done.exists():
            print('    already done', flush=True)
            continue
        done.parent.mkdir(parents=True, exist_ok=True)
        if what not in ('eval', 'flops'):  # its console goes to a file: follow it with tail -f
            print(f'    console: {done.parent / "console.txt"}', flush=True)
            with open(done.parent / 'console.txt', 'a') as console:
                subprocess.run([sys.executable, *argv[1:]], check=True, stdout=console, stderr=subprocess.STDOUT)
        else:
            subprocess.run([sys.executable, *argv[1:]], check=True)
        if what not in ('eval', 'flops'):
            done.write_text('')


def pretrain_seconds(folder):
    log = folder / 'pretrain' / 'log.txt'
    return sum(json.loads(line)['epoch_time'] for line in log.read_text().splitlines()) if log.exists() else None


def stored_results():
    """{row: {seed: {metrics}}} of docs/learning/results.json: runs whose work folder is gone (another machine,
    a cleaned cache) stay in the table, and are not run again."""
    path = DOCS / 'results.json'
    stored = json.loads(path.read_text()) if path.exists() else {}
    return {name: {int(seed): entry for seed, entry in runs.items()} for name, runs in stored.items() if name in ROWS}


def collect(work, data):
    """{row: {seed: {metrics}}} of every finished row and seed, with the commands that made it: results.json's,
    updated with what the work folder holds."""
    results = stored_results()
    for name in ROWS:
        for folder in sorted((work / name).glob('seed*')):
            seed = int(folder.name[4:])
            if ROWS[name].group == 'SCE':
                if not (folder / 'retrieval' / 'done').exists():
                    continue
                linear, retrieval = (json.loads((folder / p / 'log.txt').read_text().splitlines()[-1])
                                     for p in SCE_PROTOCOLS)
                entry = {'linear_top1': linear['test_acc1'], 'retrieval_r1': retrieval['R@1'],
                         'retrieval_r5': retrieval['R@5'], 'queries': retrieval['queries']}
            elif ROWS[name].labels is not None or ROWS[name].slak_flags is not None:
                if not (folder / 'done').exists():
                    continue
                last = json.loads((folder / 'log.txt').read_text().splitlines()[-1])
                entry = {'test_top1': last['test_acc1'], 'test_images': last['test_count'],
                         'train_loss': last['train_loss']}
                if ROWS[name].slak_flags is not None:
                    entry.update(large_kernel_nonzeros(folder / 'checkpoint-last.pth'))
            elif (folder / 'eval.json').exists():
                entry = json.loads((folder / 'eval.json').read_text())
                if (folder / 'eval_grid.json').exists():
                    grid = json.loads((folder / 'eval_grid.json').read_text())
                    entry.update(grid_knn_top1_k20=grid['knn_top1_k20'], grid_linear_top1=grid['linear_top1'])
                entry['pretrain_seconds'] = pretrain_seconds(folder) if ROWS[name].timed else None
                entry['flops_saving'] = flops_saving(work, ROWS[name].flops)
            else:
                continue
            entry['commands'] = [shlex.join(argv) for _, argv, _ in commands(name, seed, work, data)]
            results.setdefault(name, {})[seed] = entry
    return results


def flops_saving(work, flops):
    """The fraction of LocalMIM's pretraining FLOPs a FreezeOut row saves (bench_freezeout.py's count), or None."""
    path = work / f'flops_{flops[2]}.json' if flops else None
    if path is None or not path.exists():
        return None
    schedule, variant, _ = flops
    counted = json.loads(path.read_text().splitlines()[-1])
    return run_savings(counted['depths'], counted['epochs'], counted['warmup_epochs'])[schedule][variant]


def large_kernel_nonzeros(checkpoint):
    """{'kernel_weights', 'kernel_nonzeros'}: the weights of the depthwise large-kernel branches in `checkpoint`, and
    how many of them are non-zero (what dynamic sparse training keeps)."""
    import torch
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)['model']
    kernels = [v for k, v in state.items() if '.large_kernel.' in k and k.endswith('conv.weight')]
    return {'kernel_weights': sum(v.numel() for v in kernels),
            'kernel_nonzeros': sum(int(v.count_nonzero()) for v in kernels)}


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
    lines = ['| row | seeds | 20-NN top-1 (%) | linear probe top-1 (%) | linear probe, 2x2 grid (%) | pretraining (min) '
             '| vs LocalMIM time | vs LocalMIM FLOPs |', '|---|---|---|---|---|---|---|---|']
    base = results.get('localmim', {})
    for name, row in ROWS.items():
        runs = list(results.get(name, {}).values())
        if not runs or row.labels is not None or row.slak_flags is not None or row.group == 'SCE':
            continue
        minutes = [r['pretrain_seconds'] / 60 if r['pretrain_seconds'] else None for r in runs]
        saving = '-'
        if row.group == 'FreezeOut':  # against LocalMIM of the same seed: runs of another sitting may be on another CPU
            changes = [100 * (r['pretrain_seconds'] / base[seed]['pretrain_seconds'] - 1)
                       for seed, r in results[name].items() if r['pretrain_seconds']
                       and (base.get(seed) or {}).get('pretrain_seconds')]
            saving = f'{cell(changes)}%' if changes else '-'
        flops = runs[0].get('flops_saving')
        grid = 'all pixels' if row.encoder == 'pixels' else cell([r.get('grid_linear_top1') for r in runs])
        lines.append(f'| {row.title} | {len(runs)} | {cell([r["knn_top1_k20"] for r in runs])} | '
                     f'{cell([r.get("linear_top1") for r in runs])} | {grid} | {cell(minutes)} | {saving} | '
                     f'{"-" if flops is None else f"{-100 * flops:+.1f}%"} |')
    tuned = [(name, row) for name, row in ROWS.items() if row.labels is not None and results.get(name)]
    if tuned:
        lines += ['', '| fine-tuning | labelled images | seeds | test top-1 (%) |', '|---|---|---|---|']
        lines += [f'| {row.title} | {PER_CLASS * 10 * row.labels // 100:,} ({row.labels}%) | {len(results[name])} | '
                  f'{cell([r["test_top1"] for r in results[name].values()])} |' for name, row in tuned]
    slak = [(name, row) for name, row in ROWS.items() if row.slak_flags is not None and results.get(name)]
    if slak:
        lines += ['', f'| supervised, {SLAK_PER_CLASS * 10:,} labelled images | seeds | test top-1 (%) | '
                      'large-kernel weights non-zero |', '|---|---|---|---|']
        for name, row in slak:
            runs = list(results[name].values())
            nonzero = statistics.mean(r['kernel_nonzeros'] / r['kernel_weights'] for r in runs)
            lines.append(f'| {row.title} | {len(runs)} | {cell([r["test_top1"] for r in runs])} | '
                         f'{runs[0]["kernel_nonzeros"]:,} of {runs[0]["kernel_weights"]:,} ({100 * nonzero:.0f}%) |')
    sce = [(name, row) for name, row in ROWS.items() if row.group == 'SCE' and results.get(name)]
    if sce:
        lines += ['', f'| video, {SCE_PER_CLASS * 10} train / {SCE_PER_CLASS * 10} val clips | seeds | '
                      'linear top-1 (%) | retrieval R@1 (%) | R@5 (%) |', '|---|---|---|---|---|']
        lines += [f'| {row.title} | {len(results[name])} | ' + ' | '.join(
            cell([r[key] for r in results[name].values()]) for key in ('linear_top1', 'retrieval_r1', 'retrieval_r5'))
            + ' |' for name, row in sce]
    lines += ['', '| published, supervised, 60,000 labels | test top-1 (%) |', '|---|---|']
    lines += [f'| {title} | {accuracy} |' for title, accuracy in PUBLISHED]
    return '\n'.join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in ROWS.items():
        runs = [r for r in results.get(name, {}).values() if r.get('pretrain_seconds')]
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
            if seed in stored_results().get(name, {}) and not (work / name / f'seed{seed}').exists():
                print(f'{name} seed {seed}: in {DOCS / "results.json"}, not run again', flush=True)
                continue
            run_row(name, seed, work, data)
            report(work, data)
    if args.report or not args.rows:
        report(work, data)


if __name__ == '__main__':
    os.environ.setdefault('PYTHONUNBUFFERED', '1')
    main()
