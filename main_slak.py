"""SLaK (Sparse Large Kernel ConvNeXt, ICLR 2023): ImageNet training and evaluation with the official flags.

    python main_slak.py --data_path demo --model SLaK_tiny ...        # CPU demo: see docs/SLAK.md
    torchrun --nproc_per_node=8 main_slak.py --Decom True --sparse --width_factor 1.3 -u 100 --sparsity 0.4 \\
        --sparse_init snip --prune_rate 0.3 --growth random --epochs 300 --model SLaK_small --drop_path 0.4 \\
        --batch_size 64 --lr 4e-3 --update_freq 8 --model_ema true --model_ema_eval true \\
        --data_path /path/to/imagenet-1k --num_workers 40 --kernel_size 51 49 47 13 5 --output_dir out
    python main_slak.py --model SLaK_tiny --eval true --Decom True --width_factor 1.3 --resume ckpt.pth ...

Flags and defaults are those of the official main.py (https://github.com/VITA-Group/SLaK/blob/main/main.py);
booleans take true/false (a bare `--model_ema` means true). With --sparse, the masks (util/slak/sparse_training.py)
are built after the model, DDP wrapper, optimizer and loader, and an engine hook applies, prunes and regrows them
after every optimizer step, before the masked EMA update. README.md lists the outputs, the official bugs fixed
here and what is not supported.
"""
import argparse
import copy
import datetime
import glob
import os
import re
import time

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import models  # noqa: F401  (registers SLaK_* with timm)
from engine import train_one_epoch
from engine_finetune import classification_loss, evaluate, evaluate_checkpoint
from models.slak import CONV_IMPLS
from util.checkpoint import read_checkpoint, save_checkpoint, what_model
from util.classification import add_augmentation_args, build_criterion, build_mixup, convnext_param_groups
from util.cli import add_bool_arg, add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.datasets import (ImageFolderOrFlat, add_finetune_data_args, build_finetune_dataset,
                                build_finetune_transform, check_finetune_data_args, check_resumed_split)
from util.data.samplers import build_eval_loader
from util.dist import get_world_size, is_main_process
from util.hooks import ModelEmaHook
from util.lr_sched import IterationSchedule, cosine_scheduler
from util.preemption import MidEpochCheckpoints
from util.runtime import (append_log_line, attach_ddp, build_train_loader, evaluates_epoch, keeps_checkpoint,
                          make_log_writer, resume_path, resume_training, run_cli, setup_run)
from util.slak.hooks import MaskedEmaHook
from util.slak.sparse_training import Masking, add_sparse_args, density_from_sparsity
from util.train_step import AMP_DTYPES, TrainStep

EVAL_RESIZE = 'convnext'  # util.data.datasets.build_eval_transform's rule: as ConvNeXt's and SLaK's datasets.py
UNSUPPORTED = {'enable_wandb': False, 'train_interpolation': 'bicubic',
               'imagenet_default_mean_and_std': True, 'model_prefix': ''}


def get_args_parser():
    p = argparse.ArgumentParser('SLaK training and evaluation', add_help=True)

    def boolean(name, default, help=None):
        add_bool_arg(p, name, default, help)

    p.add_argument('--batch_size', default=64, type=int, help='per process')
    p.add_argument('--epochs', default=300, type=int)
    p.add_argument('--update_freq', default=1, type=int, help='gradient accumulation steps')
    # model
    p.add_argument('--model', default='SLaK_tiny', type=str, help='SLaK_tiny, SLaK_small, SLaK_base, SLaK_large')
    p.add_argument('--drop_path', type=float, default=0)
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--layer_scale_init_value', default=1e-6, type=float)
    p.add_argument('--kernel_size', type=int, nargs='*', default=[51, 49, 47, 13, 5],
                   help='large kernel of each of the 4 stages, then the short side of the strips / small kernel')
    p.add_argument('--width_factor', type=float, default=1.0)
    boolean('--Decom', False, 'decompose each large kernel into K x N and N x K strips')
    boolean('--bn', True)
    p.add_argument('--conv_impl', default='auto', choices=CONV_IMPLS, help='depthwise conv route (ours)')
    p.add_argument('--grad_ckpt', action='store_true',
                   help='recompute activations in the backward pass (activation checkpointing, ours): much less '
                        'memory for ~30%% more compute')
    # EMA
    boolean('--model_ema', False)
    p.add_argument('--model_ema_decay', type=float, default=0.9999)
    boolean('--model_ema_force_cpu', False)
    boolean('--model_ema_eval', False, 'also evaluate the EMA every epoch')
    # optimizer and schedules (per optimizer step)
    p.add_argument('--opt', default='adamw', type=str, help='a timm optimizer name')
    p.add_argument('--opt_eps', default=1e-8, type=float)
    p.add_argument('--opt_betas', default=None, type=float, nargs='+')
    p.add_argument('--clip_grad', type=float, default=None)
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--weight_decay_end', type=float, default=None, help='cosine to this (default: constant)')
    p.add_argument('--lr', type=float, default=4e-3)
    p.add_argument('--layer_decay', type=float, default=1.0)
    p.add_argument('--min_lr', type=float, default=1e-6)
    p.add_argument('--warmup_epochs', type=int, default=20)
    p.add_argument('--warmup_steps', type=int, default=-1, help='overrides --warmup_epochs when > 0')
    add_augmentation_args(p, color_jitter=0.4, mixup=0.8, cutmix=1.0)
    p.add_argument('--train_interpolation', type=str, default='bicubic')
    p.add_argument('--crop_pct', type=float, default=None)
    boolean('--resplit', False, 'unused, as officially')
    # starting points, data, outputs
    p.add_argument('--finetune', default='', help='initialise from this checkpoint (a differing head is dropped)')
    p.add_argument('--head_init_scale', default=1.0, type=float)
    p.add_argument('--model_key', default='model|module', type=str)
    p.add_argument('--model_prefix', default='', type=str)
    add_finetune_data_args(p, '/datasets01/imagenet_full_size/061417/')
    p.add_argument('--eval_data_path', default=None, type=str, help='validation folder of --data_set image_folder')
    p.add_argument('--nb_classes', default=1000, type=int)
    boolean('--imagenet_default_mean_and_std', True)
    p.add_argument('--data_set', default='IMNET', choices=['IMNET', 'image_folder'])
    p.add_argument('--output_dir', default='')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (none if unset)')
    add_resume_flags(p)
    boolean('--save_ckpt', True)
    p.add_argument('--save_ckpt_freq', default=10, type=int,
                   help='also keep checkpoint-<epoch>.pth for epochs 0, N, 2N, ... and the last (official: N-1, 2N-1, ...)')
    p.add_argument('--save_ckpt_num', default=3, type=int)
    boolean('--eval', False, 'only evaluate the --resume checkpoint')
    boolean('--dist_eval', True)
    boolean('--disable_eval', False, 'no evaluation during training')
    p.add_argument('--eval_freq', default=1, type=int, metavar='N',
                   help='evaluate every N epochs and after the last (as run_finetune.py)')
    p.add_argument('--num_workers', default=10, type=int)
    add_launcher_flags(p, world_size=True, dist_on_itp='bool')
    boolean('--use_amp', False)
    p.add_argument('--amp', default=None, choices=sorted(AMP_DTYPES), help='autocast dtype (ours)')
    boolean('--enable_wandb', False)
    p.add_argument('--project', default='SLaK', type=str)
    boolean('--wandb_ckpt', False)
    p.add_argument('--print_freq', default=10, type=int)
    add_run_flags(p)
    return add_sparse_args(p)


def check_args(args):
    for flag, default in UNSUPPORTED.items():
        if getattr(args, flag) != default:
            raise ValueError(f'--{flag} {getattr(args, flag)} is not supported here (only {default})')
    names = timm.list_models('SLaK_*')
    if args.model not in names:
        raise ValueError(f'unknown --model {args.model}: one of {", ".join(names)}')
    if len(args.kernel_size) != 5:
        raise ValueError(f'--kernel_size takes 5 numbers (the large kernel of each of the 4 stages, then the '
                         f'strip width / small kernel, e.g. 51 49 47 13 5), got {len(args.kernel_size)}')
    check_flags(args, {'--batch_size': '>= 1', '--epochs': '>= 1', '--update_freq': '>= 1', '--input_size': '>= 1',
                       '--kernel_size': '>= 1', '--width_factor': '> 0', '--drop_path': '[0, 1)',
                       '--model_ema_decay': '[0, 1]', '--clip_grad': '>= 0', '--weight_decay': '>= 0',
                       '--weight_decay_end': '>= 0', '--lr': '> 0', '--layer_decay': '(0, 1]', '--min_lr': '>= 0',
                       # --warmup_steps > 0 replaces --warmup_epochs
                       '--warmup_epochs': '>= 0' if args.warmup_steps > 0 else '[0, --epochs]',
                       '--color_jitter': '>= 0', '--smoothing': '[0, 1)', '--reprob': '[0, 1]', '--recount': '>= 1',
                       '--mixup': '>= 0', '--cutmix': '>= 0', '--mixup_prob': '[0, 1]', '--mixup_switch_prob': '[0, 1]',
                       '--crop_pct': '(0, 1]', '--nb_classes': '>= 1', '--save_ckpt_freq': '>= 1',
                       '--eval_freq': '>= 1', '--num_workers': '>= 0', '--print_freq': '>= 1', '--max_nonfinite': '>= 0',
                       '--save_every_steps': '>= 0', '--sparsity': '[0, 1)', '--prune_rate': '[0, 1]',
                       '--update-frequency': '>= 1'})
    if args.data_set == 'image_folder' and not args.eval_data_path:
        raise ValueError('--data_set image_folder needs --eval_data_path (the validation class folders)')
    check_finetune_data_args(args)
    if args.data_set == 'image_folder' and (args.val_fraction is not None or args.train_csv):
        raise ValueError('--data_set image_folder reads --data_path and --eval_data_path as they are: drop it to use '
                         '--val_fraction or --train_csv')


def build_dataset(is_train, args):
    if args.data_set == 'image_folder':
        dataset = ImageFolderOrFlat(args.data_path if is_train else args.eval_data_path,
                                    build_finetune_transform(is_train, args, EVAL_RESIZE), drop_unreadable=not is_train)
    else:
        dataset = build_finetune_dataset(is_train, args, EVAL_RESIZE)
    if len(dataset.classes) > args.nb_classes:
        raise ValueError(f'{dataset.root} has {len(dataset.classes)} classes, more than --nb_classes {args.nb_classes}')
    return dataset


def build_model(args):
    model = timm.create_model(args.model, num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                              layer_scale_init_value=args.layer_scale_init_value, head_init_scale=args.head_init_scale,
                              kernel_size=args.kernel_size, width_factor=args.width_factor, Decom=args.Decom,
                              bn=args.bn, conv_impl=args.conv_impl)
    model.set_grad_checkpointing(args.grad_ckpt)
    if args.finetune and not args.eval:
        load_finetune(model, args)
    return model


def load_finetune(model, args):
    """The weights under the first --model_key in the checkpoint (or the raw dict), a head of another shape dropped;
    every other model key must be there. (util.pretrained would take SLaK's keys for FB ConvNeXt's and rename them.)"""
    if not os.path.isfile(args.finetune):
        raise FileNotFoundError(f'--finetune {args.finetune}: no such checkpoint file')
    ckpt = read_checkpoint(args.finetune)
    state = next((ckpt[k] for k in args.model_key.split('|') if isinstance(ckpt.get(k), dict)), ckpt)
    state = {k.removeprefix('module.'): v for k, v in state.items() if torch.is_tensor(v)}
    own = model.state_dict()
    dropped = [k for k in ('head.weight', 'head.bias') if k in state and state[k].shape != own[k].shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    missing = sorted(set(result.missing_keys) - set(dropped))
    if missing or result.unexpected_keys:
        raise ValueError(f'--finetune {args.finetune} holds {what_model(state)}, which does not fit {args.model} '
                         f'with these flags (--Decom, --bn, --kernel_size, --width_factor?): missing {missing[:3]}, '
                         f'unexpected {result.unexpected_keys[:3]}')
    print(f'finetuning from {args.finetune}' + (f' (new head: {args.nb_classes} classes)' if dropped else ''))


def build_optimizer(args, model):
    groups = convnext_param_groups(model, args.weight_decay, args.layer_decay)
    # fused AdamW: TrainStep skips a non-finite step on the device, without a host sync
    extra = {'eps': args.opt_eps, 'betas': tuple(args.opt_betas) if args.opt_betas else None,
             'fused': True if args.opt == 'adamw' else None}
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, **{k: v for k, v in extra.items() if v is not None})


def build_schedule(args, batches_per_epoch):
    steps = batches_per_epoch // args.update_freq
    lrs = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps, args.warmup_epochs, warmup_steps=args.warmup_steps)
    wds = cosine_scheduler(args.weight_decay, args.weight_decay if args.weight_decay_end is None
                           else args.weight_decay_end, args.epochs, steps)
    return IterationSchedule(lrs, wds, batches_per_epoch, args.update_freq)


def build_masking(args, trainer, loader, steps_per_epoch, ckpt):
    """Masks: from the checkpoint when resuming (its masks, else its non-zeros), else --sparse_init."""
    saved = ckpt.get('extra', {}).get('masking') if ckpt else None
    init = 'resume' if ckpt else args.sparse_init
    if ckpt and args.sparse_init != 'resume':
        source = 'the checkpoint' if saved else "the checkpoint's non-zero weights"
        print(f'resuming: masks from {source}, not --sparse_init {args.sparse_init}')
    masking = Masking.from_args(trainer.optimizer, args, steps_per_epoch * args.epochs,
                                init_step=steps_per_epoch * args.start_epoch)
    snip_batch = None
    if init == 'snip':  # one training batch with integer labels, no mixup, as officially
        loader.sampler.set_epoch(0)
        snip_batch = next(iter(loader))
    masking.add_module(trainer.model, init, density_from_sparsity(args.sparsity), only_L=args.only_L,
                       snip_loss=snip_batch)
    if saved:
        masking.load_state_dict(saved)
    return masking


def build_ema(args, model, masking, ckpt):
    if not args.model_ema:
        return None
    device = 'cpu' if args.model_ema_force_cpu else None
    ema = (MaskedEmaHook(model, masking, args.model_ema_decay, device) if masking is not None
           else ModelEmaHook(model, args.model_ema_decay, device=device))
    if ckpt and ckpt.get('model_ema'):  # else the EMA starts from the loaded weights, as officially
        ema.load_state_dict(ckpt['model_ema'])
    return ema


def report_nonzeros(model):
    """The published 30M/55M/95M count non-zeros only; the dense tensors are larger."""
    params = list(model.parameters())
    weights = [p for p in params if p.dim() in (2, 4)]
    nonzero = sum(int(p.count_nonzero()) for p in params)
    density = sum(int(p.count_nonzero()) for p in weights) / sum(p.numel() for p in weights)
    print(f'{nonzero / 1e6:.2f}M of {sum(p.numel() for p in params) / 1e6:.2f}M parameters are non-zero '
          f'(2-D/4-D weights: density {density:.4f})')


def evaluate_saved(args, model, val_loader, device):
    """--eval true: the checkpoint's weights, their non-zero count, and its EMA weights with --model_ema_eval."""
    amp_dtype = AMP_DTYPES[args.amp]
    stats, ckpt = evaluate_checkpoint(args, model, val_loader, device, amp_dtype)
    report_nonzeros(model)
    if args.model_ema_eval and ckpt.get('model_ema'):
        ema = copy.deepcopy(model)
        ema.load_state_dict(ckpt['model_ema'])
        stats.update({f'{k}_ema': v for k, v in evaluate(val_loader, ema, device, amp_dtype).items()})
    print(f'accuracy of the network on {stats["count"]} test images: {stats["acc1"]:.2f}%'
          + (f' (EMA {stats["acc1_ema"]:.2f}%)' if 'acc1_ema' in stats else ''))
    return stats


def evaluate_epoch(args, val_loader, model, ema, device, best, log):
    """Evaluates the model (and the EMA with --model_ema_eval) into `log`; returns the suffixes that improved."""
    runs = [('', model, device)]
    if ema is not None and args.model_ema_eval:
        runs.append(('_ema', ema.module, next(ema.module.parameters()).device))
    improved = set()
    for suffix, net, net_device in runs:
        stats = evaluate(val_loader, net, net_device, AMP_DTYPES[args.amp])
        log.update({f'test_{k}{suffix}': v for k, v in stats.items()})
        if stats['acc1'] > best['max_accuracy' + suffix]:
            improved.add(suffix)
            best['max_accuracy' + suffix] = stats['acc1']
        print(f'max accuracy{suffix.replace("_", " ")}: {best["max_accuracy" + suffix]:.2f}%')
    log.update(best)
    return improved


def save(args, epoch, trainer, model, masking, ema, best, improved=(), mid_epoch=None):
    """The checkpoints after `epoch`, or (`mid_epoch`) checkpoint-last.pth inside it."""
    if not (args.output_dir and args.save_ckpt):
        return
    extra = {**best, 'masking': masking.state_dict() if masking is not None else None, 'mid_epoch': mid_epoch}
    official = {'model_ema': ema.state_dict()} if ema is not None else None  # the official key, read on resume
    keep = mid_epoch is None and keeps_checkpoint(epoch, args.save_ckpt_freq, args.epochs)
    state = (args.output_dir, epoch - (mid_epoch is not None), trainer.num_updates, args, model, trainer.optimizer,
             trainer.scaler, extra)
    save_checkpoint(*state, keep=keep, best='' in improved, top_level=official)
    if '_ema' in improved:
        save_checkpoint(*state, name='checkpoint-best-ema.pth', top_level=official)
    if keep and is_main_process():  # keep the newest --save_ckpt_num checkpoint-<epoch>.pth
        numbered = sorted((int(m.group(1)), path) for path in glob.glob(os.path.join(args.output_dir, '*.pth'))
                          if (m := re.search(r'checkpoint-(\d+)\.pth$', path)))
        for _, path in numbered[:-args.save_ckpt_num] if args.save_ckpt_num > 0 else ():
            os.remove(path)


def main(args):
    check_args(args)
    args.amp = args.amp or ('bf16' if args.use_amp else 'none')
    device = setup_run(args)
    val_loader = build_eval_loader(build_dataset(False, args), int(1.5 * args.batch_size), args.num_workers,
                                   args.pin_mem and torch.cuda.is_available(), args.dist_eval)
    model = build_model(args)
    if args.distributed and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'{args.model}: {n_parameters / 1e6:.2f}M parameters (dense)')
    if args.eval:
        return evaluate_saved(args, model, val_loader, device)

    train_loader = build_train_loader(build_dataset(True, args), args.batch_size, args.num_workers, args.pin_mem,
                                      args.seed)
    steps_per_epoch = len(train_loader) // args.update_freq
    if steps_per_epoch == 0:
        raise ValueError(f'{len(train_loader)} batches per process are fewer than --update_freq {args.update_freq}')
    print(f'lr {args.lr:.2e}, effective batch size {args.batch_size * args.update_freq * get_world_size()}, '
          f'{steps_per_epoch} optimizer steps per epoch')
    optimizer = build_optimizer(args, model)
    trainer = TrainStep(model, optimizer, device, args.amp, args.update_freq, args.clip_grad, args.max_nonfinite)
    log_writer = make_log_writer(args.log_dir)
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: save(args, epoch, trainer, model, masking, ema, best,
                                                              mid_epoch=mid), args.save_every_steps)
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    ckpt = resume_training(args, path, model, trainer, checkpoints=checkpoints) if path else None
    best = {'max_accuracy': 0.0, 'max_accuracy_ema': 0.0}
    if ckpt:
        check_resumed_split(ckpt.get('args', {}), args)
        if 'step' not in ckpt:  # an official checkpoint
            trainer.num_updates = args.start_epoch * steps_per_epoch
        best.update({k: ckpt.get('extra', {}).get(k, 0.0) for k in best})
    attach_ddp(trainer, device)
    masking = build_masking(args, trainer, train_loader, steps_per_epoch, ckpt) if args.sparse else None
    ema = build_ema(args, model, masking, ckpt)
    hooks = [hook for hook in (masking, ema) if hook is not None]  # the EMA sees this step's masks
    mixup_fn = build_mixup(args)
    compute_loss = classification_loss(build_criterion(args, mixup_fn), device, mixup_fn)
    schedule = build_schedule(args, len(train_loader))

    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        # as the official engine: the batches of an unfinished --update_freq window are not run
        train_stats = train_one_epoch(train_loader, trainer, epoch, schedule, compute_loss, hooks, log_writer,
                                      args.print_freq, checkpoints, partial_window='skip')
        log = {f'train_{k}': v for k, v in train_stats.items()}
        evaluated = not args.disable_eval and evaluates_epoch(epoch, args.eval_freq, args.epochs)
        improved = evaluate_epoch(args, val_loader, model, ema, device, best, log) if evaluated else set()
        if masking is not None:
            log.update({f'sparse_{k}': v for k, v in masking.densities().items()})
        save(args, epoch, trainer, model, masking, ema, best, improved)
        write_bad_file_list(args.output_dir, train_loader.dataset, val_loader.dataset)
        if log_writer is not None:
            for key, value in log.items():
                if key.startswith(('test_', 'sparse_')) and not key.startswith('test_count'):
                    log_writer.add_scalar(f'perf/{key}' if key.startswith('test_') else f'sparse/{key[7:]}',
                                          value, epoch)
            log_writer.flush()
        append_log_line(args.output_dir, {**log, 'epoch': epoch, 'n_parameters': n_parameters})
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


if __name__ == '__main__':
    run_cli(main, get_args_parser())
