"""SCE (Similarity Contrastive Estimation) video pretraining of an R3D-18: the official eztorch reference run
(`resnet3d18_kinetics200.yaml`) as argparse flags whose defaults are its settings.

    # 8 GPUs, global batch 512 (64 per GPU), lr 2.4 * 512 / 256 = 4.8
    bash record.sh python -m torch.distributed.launch --nproc_per_node=8 main_sce.py \\
        --data_path /path/to/kinetics200 --output_dir output/sce_r3d18_k200
    # 2 GPUs (the official README's 2 x A100): same global batch, 256 per GPU
    bash record.sh torchrun --nproc_per_node=2 main_sce.py --data_path /path/to/kinetics200 --output_dir ...
    # SLURM: one task per GPU
    srun --kill-on-bad-exit=1 --ntasks-per-node=8 --gpus-per-node=8 python main_sce.py --data_path ... --output_dir ...
    # demo on CPU: generated frame-folder videos, tiny clips
    python main_sce.py --data_path demo --output_dir output/sce_demo --device cpu --crop_size 32 \\
        --num_frames 4 --global_batch_size 8 --queue_size 64 --epochs 2 --warmup_epochs 1 --num_workers 2

Data: `<data_path>/train.csv` (`<class>/<video> <label> <num_frames>`) and `<data_path>/train/<class>/<video>/
00000001.jpg ...`; `val.csv` and `val/` alike, if present, validate the online evaluator after every epoch.
Runs resume automatically from the newest checkpoint in --output_dir (--auto_resume false to start over).
README.md lists the outputs and what differs from the official code.
"""
import argparse
import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from engine_finetune import evaluate
from engine import train_one_epoch
from models.sce import SCE, OnlineEvalClassifier, convert_sync_batchnorm
from util.checkpoint import save_checkpoint
from util.cli import add_bool_arg, add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.samplers import build_eval_loader
from util.dist import get_world_size, is_main_process
from util.preemption import MidEpochCheckpoints
from util.runtime import (append_log_line, attach_ddp, build_train_loader, keeps_checkpoint, make_log_writer,
                          per_process_batch, resume_path, resume_training, run_cli, setup_run)
from util.sce.augment import build_sce_augmentations, clip_pair_grid
from util.sce.data import build_video_dataset
from util.sce.hooks import TEACHER_UPDATES, SCEHook
from util.sce.optim import build_lars, scale_learning_rate, sce_schedule
from util.train_step import TrainStep
from util.video.demo import video_data_root

# Colour jitter of the two configs: the reference run's "strength 1" and the baseline's.
JITTER = {'strong': dict(brightness=0.8, contrast=0.8, saturation=0.4, hue=0.2),
          'baseline': dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)}


def get_args_parser():
    p = argparse.ArgumentParser('SCE video pretraining', add_help=True)
    g = p.add_argument_group('data (reference datamodule)')
    g.add_argument('--data_path', default=None, help="Kinetics folder with train.csv and train/, or 'demo'")
    g.add_argument('--decoder', default='frame', choices=['frame', 'video'])
    g.add_argument('--num_clips', default=2, type=int, help='clips per video (= SCE global views)')
    g.add_argument('--clip_duration', default=2.56, type=float, help='seconds per clip')
    g.add_argument('--num_frames', default=8, type=int, help='frames kept per clip, uniformly')
    g.add_argument('--fps', default=30, type=int)
    g.add_argument('--speeds', default=[1], type=float, nargs='+')
    g.add_argument('--jitter_factor', default=0.0, type=float, help='clip duration jitter')
    g.add_argument('--time_difference_prob', default=0.2, type=float, help='0 in the baseline config')
    g.add_argument('--crop_size', default=224, type=int)
    g.add_argument('--crop_scale', default=[0.2, 0.766], type=float, nargs=2)
    g.add_argument('--crop_ratio', default=[0.75, 1.3333], type=float, nargs=2)
    g.add_argument('--val_crop_size', default=None, type=int,
                   help='validation clips: short side resized to this, then the centre square (reference run: '
                        '256); default round(crop_size * 256 / 224)')
    g.add_argument('--num_threads_io', default=4, type=int)
    g.add_argument('--num_threads_decode', default=4, type=int)
    g.add_argument('--num_workers', default=5, type=int, help='loader processes per GPU')
    g.add_argument('--jitter_strength', default='strong', choices=sorted(JITTER),
                   help='GPU colour jitter: strong (b 0.8, c 0.8, s 0.4, h 0.2) or baseline (0.4, 0.4, 0.2, 0.1)')
    add_sce_model_args(p)
    g = p.add_argument_group('optimisation (reference optimizer, scheduler, trainer)')
    g.add_argument('--global_batch_size', default=512, type=int, help='over all processes and --accum_iter')
    g.add_argument('--accum_iter', default=1, type=int,
                   help='micro-steps per optimizer step. An epoch whose last window is short steps on it (its loss '
                        'still divided by --accum_iter), as Lightning does for the official run')
    g.add_argument('--teacher_update', default='step', choices=TEACHER_UPDATES,
                   help='with --accum_iter > 1: step (ours) updates the momentum target once per optimizer step, as '
                        'a run at the whole batch without accumulation; micro_batch reproduces eztorch under '
                        'accumulate_grad_batches: an update after every micro-batch with the step\'s momentum, and '
                        'the momentum, coeff and temp_m schedules counting micro-batches per epoch')
    g.add_argument('--lr', default=2.4, type=float, help='initial_lr, scaled by --lr_scaler to the global batch')
    g.add_argument('--lr_scaler', default='linear', choices=['linear', 'sqrt', 'none'])
    g.add_argument('--weight_decay', default=1e-6, type=float)
    g.add_argument('--momentum', default=0.9, type=float, help='LARS momentum')
    g.add_argument('--trust_coefficient', default=1e-3, type=float)
    add_bool_arg(g, '--exclude_wd_norm', False)
    add_bool_arg(g, '--exclude_wd_bias', False)
    g.add_argument('--epochs', default=200, type=int)
    g.add_argument('--warmup_epochs', default=35, type=int)
    g.add_argument('--warmup_start_lr', default=0.0, type=float, help='scaled like --lr')
    g.add_argument('--min_lr', default=0.0, type=float, help='eta_min of the cosine, scaled like --lr')
    g.add_argument('--clip_grad', default=None, type=float, help='default: none, as official')
    g.add_argument('--amp', default='fp16', choices=['fp16', 'bf16', 'none'], help='reference run: precision 16')
    add_bool_arg(g, '--sync_bn', True, 'SyncBatchNorm everywhere (under DDP on CUDA)')
    g.add_argument('--grad_ckpt', action='store_true',
                   help='recompute the online trunk\'s activations in the backward pass (activation checkpointing, '
                        'ours): much less memory for ~30%% more compute')
    add_bool_arg(g, '--online_eval', True, 'online linear evaluator on detached trunk features (monitor only), '
                 'validated every epoch on <data_path>/val.csv when there is one')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='./output/sce_r3d18_kinetics200')
    g.add_argument('--log_dir', default=None, help='TensorBoard folder (default: <output_dir>/tensorboard)')
    g.add_argument('--print_freq', default=50, type=int)
    g.add_argument('--save_freq', default=100, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    g.add_argument('--vis_freq', default=1, type=int, help='clip-pair picture every N epochs (0: never)')
    add_run_flags(g, seed=42)
    add_resume_flags(g, start_epoch=False)
    add_launcher_flags(g)
    return p


def _optional_name(value):
    return None if value.lower() in ('none', 'null', '') else value


def add_sce_model_args(parser):
    """Every model flag of the reference run, defaults = its values."""
    g = parser.add_argument_group('SCE model')
    bool_flag = dict(action=argparse.BooleanOptionalAction)
    g.add_argument('--coeff', type=float, default=0.5, help='lambda: weight of the one-hot positive')
    g.add_argument('--temp', type=float, default=0.1, help='tau, online temperature')
    g.add_argument('--temp_m', type=float, default=0.05, help='tau_m, target temperature')
    g.add_argument('--start_warmup_temp_m', type=float, default=0.05)
    g.add_argument('--warmup_epoch_temp_m', type=int, default=0)
    g.add_argument('--warmup_scheduler_temp_m', type=_optional_name, default='cosine',
                   choices=['linear', 'cosine', None])
    g.add_argument('--warmup_epoch_coeff', type=int, default=0)
    g.add_argument('--start_warmup_coeff', type=float, default=1.0)
    g.add_argument('--warmup_scheduler_coeff', type=_optional_name, default='linear',
                   choices=['linear', 'cosine', None])
    g.add_argument('--scheduler_coeff', type=_optional_name, default=None, choices=['linear', 'cosine', None])
    g.add_argument('--final_scheduler_coeff', type=float, default=0.0)
    g.add_argument('--queue_size', type=int, default=32768, help='0: no queue (needs --use_keys)')
    g.add_argument('--queue_feature_dim', type=int, default=256)
    g.add_argument('--initial_momentum', type=float, default=0.99)
    g.add_argument('--scheduler_momentum', default='cosine', choices=['constant', 'cosine', 'cosine_epoch'])
    g.add_argument('--sym', default=True, **bool_flag)
    g.add_argument('--use_keys', default=False, **bool_flag)
    g.add_argument('--normalize_outputs', default=True, **bool_flag)
    g.add_argument('--mutual_pass', default=False, **bool_flag)
    g.add_argument('--num_global_crops', type=int, default=2)
    g.add_argument('--num_local_crops', type=int, default=0)
    g.add_argument('--num_splits', type=int, default=0, help='image-only spatial splits: only 0 is supported')
    g.add_argument('--num_splits_per_combination', type=int, default=2, help='unused while --num_splits 0')
    g.add_argument('--shuffle_bn', default=False, **bool_flag,
                   help='not supported: SyncBatchNorm is used under DDP instead (reference run)')
    g.add_argument('--num_devices', type=int, default=-1, help='only used by --shuffle_bn; accepted and ignored')
    g.add_argument('--simulate_n_devices', type=int, default=8,
                   help='only used by --shuffle_bn; accepted and ignored')
    g.add_argument('--projector_hidden_dims', type=int, nargs='*', default=[1024, 1024])
    g.add_argument('--projector_output_dim', type=int, default=256)
    g.add_argument('--projector_last_norm', default=True, **bool_flag)
    g.add_argument('--projector_last_affine', default=False, **bool_flag)
    g.add_argument('--predictor_hidden_dims', type=int, nargs='*', default=[1024])
    g.add_argument('--predictor_output_dim', type=int, default=256)
    g.add_argument('--predictor_last_norm', default=False, **bool_flag)
    g.add_argument('--predictor_last_affine', default=False, **bool_flag)
    g.add_argument('--online_eval_lr', type=float, default=1e-4, help='Adam lr of the online linear evaluator')
    return parser


def check_sce_args(args):
    """Raises ValueError naming the flag for options that are not implemented."""
    if args.shuffle_bn:
        raise ValueError('--shuffle_bn is not supported: under DDP every BN is a SyncBatchNorm (as in the '
                         'reference run), and on one device the official SplitBatchNorm only converts 2-D BN, '
                         'a no-op for R3D; drop the flag')
    if args.num_splits != 0:
        raise ValueError(f'--num_splits {args.num_splits} is not supported (image-only spatial splits); use 0')
    for name in ('coeff', 'start_warmup_coeff', 'final_scheduler_coeff'):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f'--{name} must be in [0, 1], got {getattr(args, name)}')
    for name in ('temp', 'temp_m', 'start_warmup_temp_m'):
        if getattr(args, name) <= 0:
            raise ValueError(f'--{name} must be > 0, got {getattr(args, name)}')
    if not 0.0 <= args.initial_momentum <= 1.0:
        raise ValueError(f'--initial_momentum must be in [0, 1], got {args.initial_momentum}')


SCE_ARG_NAMES = ('coeff', 'temp', 'temp_m', 'start_warmup_temp_m', 'warmup_epoch_temp_m', 'warmup_scheduler_temp_m',
                 'warmup_epoch_coeff', 'start_warmup_coeff', 'warmup_scheduler_coeff', 'scheduler_coeff',
                 'final_scheduler_coeff', 'queue_size', 'queue_feature_dim', 'initial_momentum',
                 'scheduler_momentum', 'sym', 'use_keys', 'normalize_outputs', 'mutual_pass', 'num_global_crops',
                 'num_local_crops', 'projector_hidden_dims', 'projector_output_dim', 'projector_last_norm',
                 'projector_last_affine', 'predictor_hidden_dims', 'predictor_output_dim', 'predictor_last_norm',
                 'predictor_last_affine', 'online_eval_lr')


def build_sce(args=None, steps_per_epoch=1, epochs=None, num_classes=0, trunk=None, **overrides):
    """SCE from parsed flags (`add_sce_model_args`) and/or keyword overrides; `epochs` defaults to args.epochs."""
    kwargs = {}
    if args is not None:
        check_sce_args(args)
        kwargs = {name: getattr(args, name) for name in SCE_ARG_NAMES if hasattr(args, name)}
        epochs = epochs if epochs is not None else getattr(args, 'epochs', 1)
    kwargs.update(overrides)
    model = SCE(trunk=trunk, steps_per_epoch=steps_per_epoch, epochs=epochs or 1, num_classes=num_classes, **kwargs)
    if getattr(args, 'grad_ckpt', False):
        model.set_grad_checkpointing()
    return model


def resolve_batch_and_lr(args, world_size):
    """Per-process micro-batch (args.batch_size, the loader's) and the scaled lr (args.abs_lr) of the global batch."""
    args.batch_size = per_process_batch(args.global_batch_size, world_size, args.accum_iter, '--global_batch_size')
    scale = lambda lr: scale_learning_rate(lr, args.global_batch_size, args.lr_scaler)  # noqa: E731
    args.abs_lr, args.abs_warmup_start_lr, args.abs_min_lr = scale(args.lr), scale(args.warmup_start_lr), \
        scale(args.min_lr)
    return args.batch_size


def check_args(args):
    if not args.data_path:
        raise ValueError("--data_path is required: a folder with train.csv and train/, or 'demo'")
    views = args.num_global_crops + args.num_local_crops
    if args.num_clips != 2 or views != 2:
        raise ValueError(f'--num_clips {args.num_clips} with {views} SCE crops: the video pipeline has two views '
                         f'(two clips, one per augmentation pipeline); use --num_clips 2 and 2 global crops')
    check_flags(args, {'--num_frames': '>= 1', '--clip_duration': '> 0', '--fps': '>= 1', '--speeds': '> 0',
                       '--jitter_factor': '[0, 1)', '--time_difference_prob': '[0, 1]', '--crop_size': '>= 1',
                       '--crop_scale': '(0, 1]', '--crop_ratio': '> 0', '--val_crop_size': '>= 1',
                       '--num_threads_io': '>= 1', '--num_threads_decode': '>= 1', '--num_workers': '>= 0',
                       '--global_batch_size': '>= 1', '--accum_iter': '>= 1', '--lr': '> 0', '--weight_decay': '>= 0',
                       '--momentum': '[0, 1)', '--trust_coefficient': '> 0', '--epochs': '>= 1',
                       '--warmup_epochs': '[0, --epochs]', '--warmup_start_lr': '>= 0', '--min_lr': '>= 0',
                       '--clip_grad': '>= 0', '--max_nonfinite': '>= 0', '--print_freq': '>= 1', '--save_freq': '>= 1',
                       '--save_every_steps': '>= 0', '--vis_freq': '>= 0', '--queue_size': '>= 0',
                       '--online_eval_lr': '> 0'})
    check_sce_args(args)
    # a multiple of --accum_iter; of the number of processes too, checked once they are known
    per_process_batch(args.global_batch_size, 1, args.accum_iter, '--global_batch_size')


def build_dataset(args):
    return build_video_dataset(
        args.data_path, 'train', args.decoder, num_clips=args.num_clips, clip_duration=args.clip_duration,
        num_frames=args.num_frames, fps=args.fps, speeds=args.speeds, jitter_factor=args.jitter_factor,
        time_difference_prob=args.time_difference_prob, crop_size=args.crop_size, crop_scale=args.crop_scale,
        crop_ratio=args.crop_ratio, num_threads_io=args.num_threads_io, num_threads_decode=args.num_threads_decode)


class TwoViewLoss:
    """The engine's `compute_loss`: both clips of each video through their augmentation pipeline (on the device,
    fp32, no grad, as the official), then SCE. Keeps the first few augmented pairs of the latest step for the
    picture, so drawing it consumes no random numbers (a resumed run replays the same augmentations)."""

    def __init__(self, augmentations, keep=4):
        self.augmentations, self.keep, self.last_pair = augmentations, keep, None

    def __call__(self, model, samples, labels):
        views = [aug(samples[:, i]) for i, aug in enumerate(self.augmentations)]
        self.last_pair = [v[:self.keep].detach().clone() for v in views]
        return model(views, labels)


def save_clip_pairs(pair, output_dir, epoch, log_writer=None):
    frames = min(4, pair[0].shape[2])
    grid = clip_pair_grid(*pair, n=len(pair[0]), frames=frames)
    folder = Path(output_dir) / 'vis'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(
        folder / f'clip_pairs_epoch{epoch:04d}.png')
    if log_writer is not None:
        log_writer.add_image('sce/clip_pairs', grid, epoch)


def build_online_val_loader(args):
    """Centre clips of the validation split, each video on one rank only; None (with a note) without val.csv."""
    root = video_data_root(args.data_path, args.decoder)
    if not (root / 'val.csv').is_file():
        print(f'no {root / "val.csv"}: the online evaluator is trained but not validated')
        return None
    dataset = build_video_dataset(
        root, 'val', args.decoder, center_clip=True, clip_duration=args.clip_duration, num_frames=args.num_frames,
        fps=args.fps, crop_size=args.val_crop_size or round(args.crop_size * 256 / 224),
        num_threads_io=args.num_threads_io, num_threads_decode=args.num_threads_decode)
    return build_eval_loader(dataset, args.batch_size, args.num_workers, args.pin_mem and torch.cuda.is_available(),
                             dist_eval=True)


def validate_online(loader, model, device, amp_dtype):
    """Loss, top-1 / top-5 accuracy and count of the online evaluator over the validation clips, the trunk in
    eval mode (BN running statistics). Under DDP every rank first takes rank 0's BN statistics (without SyncBN
    they drift apart; only evaluation reads them), so the result is that of the saved model. The training's
    random streams are left untouched (a DataLoader draws its workers' seed from them)."""
    if dist.is_available() and dist.is_initialized() and get_world_size() > 1:
        for buffer in model.trunk.buffers():
            dist.broadcast(buffer, 0)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda):
        return evaluate(loader, OnlineEvalClassifier(model), device, amp_dtype)


def save(args, epoch, model, trainer, mid_epoch=None):
    """checkpoint-last.pth (and a kept checkpoint-<epoch>.pth) after `epoch`, or (`mid_epoch`) inside it."""
    extra = {'online_evaluator_optimizer': model.online_evaluator.optimizer.state_dict()
             if model.online_evaluator is not None else None, 'mid_epoch': mid_epoch}
    save_checkpoint(args.output_dir, epoch - (mid_epoch is not None), trainer.num_updates, args, model,
                    trainer.optimizer, trainer.scaler, extra=extra,
                    keep=mid_epoch is None and keeps_checkpoint(epoch, args.save_freq, args.epochs))


def resume(args, model, trainer, checkpoints):
    """Restores model (target network, queue, pointer, online evaluator), LARS, GradScaler, RNG and the step."""
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    if not path:
        return
    ckpt = resume_training(args, path, model, trainer, checkpoints=checkpoints)
    model.global_step = trainer.num_updates
    online_state = ckpt.get('extra', {}).get('online_evaluator_optimizer')
    if model.online_evaluator is not None and online_state:
        model.online_evaluator.optimizer.load_state_dict(online_state)


def main(args):
    check_args(args)
    device = setup_run(args)
    if device.type == 'cpu' and args.amp == 'fp16':  # CPU fp16 autocast: ~30x slower than fp32 for R3D
        print('--amp fp16 has no fast CPU kernels: running in fp32 on the CPU (--amp none)')
        args.amp = 'none'
    world = get_world_size()
    resolve_batch_and_lr(args, world)
    dataset = build_dataset(args)
    loader = build_train_loader(dataset, args.batch_size, args.num_workers, args.pin_mem, args.seed,
                                '--global_batch_size')
    val_loader = build_online_val_loader(args) if args.online_eval else None
    steps_per_epoch = len(dataset) // args.global_batch_size  # as eztorch: schedules count rows / global batch
    if steps_per_epoch < 1 or len(loader) < args.accum_iter:
        raise ValueError(f'{len(dataset)} videos make no full global batch of {args.global_batch_size}: '
                         f'lower --global_batch_size or add data')
    # eztorch's horizons count loader batches (rows / (devices x batch)), micro-batches under accumulation
    schedule_steps = len(dataset) // (args.global_batch_size // args.accum_iter) \
        if args.teacher_update == 'micro_batch' else steps_per_epoch
    model = build_sce(args, schedule_steps, args.epochs, dataset.num_classes if args.online_eval else 0)
    model.to(device)
    if args.sync_bn:
        model = convert_sync_batchnorm(model)
    optimizer = build_lars(model, args.abs_lr, args.weight_decay, args.momentum, args.trust_coefficient,
                           args.exclude_wd_bias, args.exclude_wd_norm)
    trainer = TrainStep(model, optimizer, device, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)
    args.start_epoch = 0
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: save(args, epoch, model, trainer, mid), args.save_every_steps)
    resume(args, model, trainer, checkpoints)
    # Under DDP the target and the online evaluator are outside the reducer (models/sce.py). Buffers (queue,
    # pointer, BN statistics) are copied from rank 0 once, never at each forward: the queue's random start differs
    # per rank seed. (`broadcast_buffers=False` would skip that first copy.)
    attach_ddp(trainer, device, forward_sync_buffers=False)
    schedule = sce_schedule(args.abs_lr, args.weight_decay, args.epochs, args.warmup_epochs, steps_per_epoch,
                            len(loader), args.accum_iter, args.abs_warmup_start_lr, args.abs_min_lr,
                            steps_done=lambda: trainer.num_updates)
    compute_loss = TwoViewLoss(build_sce_augmentations(**JITTER[args.jitter_strength]))
    log_writer = make_log_writer(args.log_dir or os.path.join(args.output_dir, 'tensorboard'))
    print(f'SCE R3D-18: {len(dataset)} videos ({dataset.num_classes} classes) from {args.data_path}; global batch '
          f'{args.global_batch_size} = {world} x {args.batch_size} x {args.accum_iter}; lr {args.lr} -> '
          f'{args.abs_lr:g}; {steps_per_epoch} steps per epoch; amp {args.amp}')

    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        model.epoch = epoch
        stats = train_one_epoch(loader, trainer, epoch, schedule, compute_loss, [SCEHook(model, args.teacher_update)],
                                log_writer, args.print_freq, checkpoints, partial_window='step')
        last = epoch + 1 == args.epochs
        save(args, epoch, model, trainer)
        if is_main_process() and args.vis_freq and (epoch % args.vis_freq == 0 or last):
            save_clip_pairs(compute_loss.last_pair, args.output_dir, epoch, log_writer)
        epoch_time = stats.pop('epoch_time')
        val_stats = {}
        if val_loader is not None:
            val = validate_online(val_loader, model, device, trainer.amp_dtype)
            # accuracies as fractions, like train_online_acc1 (and the official online/val_acc_1)
            val_stats = {'online_val_loss': val['loss'], 'online_val_acc1': val['acc1'] / 100,
                         'online_val_acc5': val['acc5'] / 100, 'online_val_skipped_files': val.get('skipped_files', 0)}
            print(f"online evaluator on {val['count']} val videos: " +
                  ' '.join(f'{k} {v:.4f}' for k, v in val_stats.items()))
        write_bad_file_list(args.output_dir, loader.dataset, val_loader.dataset if val_loader is not None else None)
        append_log_line(args.output_dir, {**{f'train_{k}': v for k, v in stats.items()}, **val_stats, 'epoch': epoch,
                                          'epoch_time': epoch_time, 'step': trainer.num_updates,
                                          'skipped_steps': int(trainer.skipped)})
        if log_writer is not None:
            for name in ('loss', 'pos_weight', 'z_std', 'k_std', 'queue_fill', 'online_acc1'):
                if name in stats:
                    log_writer.add_scalar(f'epoch/{name}', stats[name], epoch)
            for name, value in val_stats.items():
                log_writer.add_scalar(f'epoch/{name}', value, epoch)
            log_writer.flush()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


if __name__ == '__main__':
    run_cli(main, get_args_parser())
