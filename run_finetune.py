"""Fine-tuning and linear probing of pretrained encoders (LocalMIM / MAE ViTs, SparK CNNs, any timm classifier).

    python run_finetune.py --data_path demo --model vit_tiny_patch16 --finetune output_demo/checkpoint-last.pth ...
    torchrun --nproc_per_node=8 run_finetune.py --batch_size 128 --model vit_base_patch16 --finetune ckpt.pth ...
    python run_finetune.py --linprobe --finetune ckpt.pth ...     # MAE's main_linprobe.py recipe and defaults

Flags and defaults are MAE's main_finetune.py ones, or main_linprobe.py's under --linprobe (LARS with momentum 0.9,
cls token, no drop path, plain cross-entropy, crop + flip, blr 0.1, weight decay 0, 90 epochs, 10 of warmup,
batch 512); a flag given on the command line wins over either. SparK's ImageNet recipe adds --opt lamb, --bce,
--crop_pct, --repeated_aug and --aa v0 / ta_wide. See README.md for what differs from the official code.
"""
import argparse
import datetime
import time

import timm
import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from timm.optim import Lamb, param_groups_layer_decay

import models
from engine import train_one_epoch
from engine_finetune import classification_loss, evaluate, evaluate_checkpoint
from util.checkpoint import save_checkpoint
from util.classification import add_augmentation_args, build_criterion, build_mixup, layer_decay_param_groups
from util.cli import add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.datasets import (add_finetune_data_args, build_finetune_dataset, check_finetune_data_args,
                                check_resumed_split)
from util.data.samplers import build_eval_loader, with_repeated_augmentation
from util.dist import get_world_size
from util.hooks import ModelEmaHook
from util.lars import LARS
from util.lr_sched import WarmupCosine
from util.preemption import MidEpochCheckpoints
from util.pretrained import load_pretrained
from util.runtime import (append_log_line, attach_ddp, build_train_loader, evaluates_epoch, keeps_checkpoint,
                          make_log_writer, resume_path, resume_training, run_cli, setup_run)
from util.spark.layer_decay import spark_layer_depths
from util.train_step import AMP_DTYPES, TrainStep


# Defaults that differ between fine-tuning (MAE's main_finetune.py) and linear probing (MAE's main_linprobe.py).
# The parser leaves these flags None and fills them in after parsing, so a flag that is given always wins.
FINETUNE_DEFAULTS = dict(batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, min_lr=1e-6, warmup_epochs=5,
                         drop_path=0.1, global_pool=True, smoothing=0.1, aa='rand-m9-mstd0.5-inc1', reprob=0.25,
                         opt='adamw')
LINPROBE_DEFAULTS = dict(batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, min_lr=0.0, warmup_epochs=10,
                         drop_path=0.0, global_pool=False, smoothing=0.0, aa='none', reprob=0.0, opt='lars')


def resolve_defaults(args):
    """Fills the flags left at None with the fine-tuning or (--linprobe) linear-probing default."""
    for name, value in (LINPROBE_DEFAULTS if args.linprobe else FINETUNE_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class FinetuneArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        return resolve_defaults(parsed), rest


def get_args_parser():
    parser = FinetuneArgumentParser('fine-tuning / linear probing', add_help=True)

    def mode_default(name, help=''):
        return (f'{help}; ' if help else '') + \
            f'default {FINETUNE_DEFAULTS[name]} (--linprobe: {LINPROBE_DEFAULTS[name]})'.replace('%', '%%')

    parser.add_argument('--batch_size', default=None, type=int, help=mode_default('batch_size', 'per GPU'))
    parser.add_argument('--epochs', default=None, type=int, help=mode_default('epochs'))
    parser.add_argument('--accum_iter', default=1, type=int)
    parser.add_argument('--model', default='vit_large_patch16', type=str, metavar='MODEL',
                        help='vit_{tiny,small,base,large}_patch16, vit_huge_patch14, or any timm classifier')
    parser.add_argument('--input_size', default=224, type=int)
    parser.add_argument('--drop_path', type=float, default=None, metavar='PCT', help=mode_default('drop_path'))
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM')
    parser.add_argument('--grad_ckpt', action='store_true',
                        help='recompute activations in the backward pass (activation checkpointing): much less '
                             'memory for ~30%% more compute')
    parser.add_argument('--opt', default=None, choices=['adamw', 'lamb', 'lars'],
                        help=mode_default('opt', "lamb: timm's Lamb as SparK's ResNet recipe sets it (max_grad_norm "
                                                 '1e7, always_adapt, no bias correction); lars: MAE\'s LARS'))
    parser.add_argument('--weight_decay', type=float, default=None, help=mode_default('weight_decay'))
    parser.add_argument('--lr', type=float, default=None, metavar='LR')
    parser.add_argument('--blr', type=float, default=None, metavar='LR',
                        help=mode_default('blr', 'base learning rate: absolute_lr = base_lr * total_batch_size / 256'))
    parser.add_argument('--layer_decay', type=float, default=0.75,
                        help="layer-wise lr decay (ViTs: MAE's depths; timm ResNet-50/101/152/200 and ConvNeXts: "
                             "SparK's; other CNNs: one depth per stage)")
    parser.add_argument('--min_lr', type=float, default=None, metavar='LR', help=mode_default('min_lr'))
    parser.add_argument('--warmup_epochs', type=int, default=None, metavar='N', help=mode_default('warmup_epochs'))
    add_augmentation_args(parser)
    parser.set_defaults(smoothing=None, aa=None, reprob=None)  # resolve_defaults: fine-tuning or linear probing
    parser.add_argument('--bce', action='store_true',
                        help="timm's BinaryCrossEntropy instead of cross-entropy (SparK's ResNet recipe)")
    parser.add_argument('--crop_pct', type=float, default=None,
                        help='evaluation: resize to input_size / crop_pct, centre crop (default: 224/256 up to '
                             '224 px, 1.0 above; SparK: 0.95)')
    parser.add_argument('--eval_resize', default='mae', choices=['mae', 'convnext'],
                        help="mae: resize the short side and centre-crop at every size; convnext (SparK's and "
                             'ConvNeXt\'s fine-tuning): from 384 px resize to exactly input_size x input_size')
    parser.add_argument('--repeated_aug', type=int, default=0, metavar='N',
                        help="repeated augmentation with timm's RepeatAugSampler, N copies (SparK's ConvNeXts: 3)")
    parser.add_argument('--resplit', action='store_true', default=False)
    # what to start from and how to pool
    parser.add_argument('--finetune', default='', help='pretrained checkpoint (ours, LocalMIM, MAE, SparK encoder)')
    parser.add_argument('--global_pool', action='store_true', default=None,
                        help='mean pool (ViTs; the fine-tuning default)')
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='cls token instead of mean pool (the --linprobe default)')
    parser.add_argument('--linprobe', action='store_true',
                        help='train only a linear head (BatchNorm without affine + Linear) on the frozen encoder, '
                             'whose BatchNorm statistics stay as pretrained')
    parser.add_argument('--model_ema', action='store_true', help='keep (and evaluate) an EMA of the weights')
    parser.add_argument('--model_ema_decay', type=float, default=0.9999)
    # data, outputs, runtime
    add_finetune_data_args(parser, './dataset/ImageNet/')
    parser.add_argument('--nb_classes', default=1000, type=int)
    parser.add_argument('--output_dir', default='./output/MAE_ViT_B_Finetune')
    parser.add_argument('--log_dir', default=None)
    add_resume_flags(parser, no_auto_resume=True)
    parser.add_argument('--eval', action='store_true', help='only evaluate (the --resume checkpoint)')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='split evaluation across processes (each sample counted once)')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                        help='autocast dtype (default: bf16 on GPU, none on CPU; official: fp16)')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--print_freq', default=50, type=int)
    parser.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    parser.add_argument('--eval_freq', default=1, type=int, metavar='N',
                        help='evaluate on the validation set every N epochs and after the last (many short epochs '
                             'of a small labelled set: evaluating each would cost more than training)')
    add_run_flags(parser, pin_mem='flags')
    add_launcher_flags(parser, world_size=True)
    return parser


def build_model(args):
    if not timm.is_model(args.model):
        raise ValueError(f'unknown --model {args.model} (a timm classifier or vit_*_patch16 / vit_huge_patch14)')
    kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path)
    if args.model in models.vit.FINETUNE_VITS:
        kwargs.update(global_pool=args.global_pool, img_size=args.input_size)
    model = timm.create_model(args.model, **kwargs)
    if args.finetune and not args.eval:
        load_pretrained(model, args.finetune)
    if args.grad_ckpt:
        enable_grad_checkpointing(model, args.model)
    if args.linprobe:
        head = model.get_classifier()
        classifier_name = next(name for name, module in model.named_modules() if module is head)
        nn.init.trunc_normal_(head.weight, std=0.01)
        model.requires_grad_(False)
        model = freeze_batch_norm_2d(model)  # the encoder's BN uses (and keeps) its pretrained statistics
        probe = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        parent, _, leaf = classifier_name.rpartition('.')
        setattr(model.get_submodule(parent) if parent else model, leaf, probe)
        probe.requires_grad_(True)
    return model


def enable_grad_checkpointing(model, name):
    """timm's `set_grad_checkpointing()`, refused where timm would rerun a BatchNorm in the backward pass and so
    update its running statistics twice (ResNets; the ViTs and ConvNeXts have none)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f'--grad_ckpt: {name} has BatchNorm layers, whose running statistics timm\'s activation '
                         f'checkpointing would update twice per step; drop --grad_ckpt for this model')
    model.set_grad_checkpointing(True)


class StageGrouping:
    """A CNN as timm's layer-decay grouping sees it, with its coarse matcher: one lr scale per stage
    (stem, stages, head) rather than per block, which would shrink a ResNet-50 stem's lr by decay^17."""

    def __init__(self, model):
        self.model = model

    def group_matcher(self, coarse=False):
        return self.model.group_matcher(coarse=True)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)


def build_param_groups(args, model):
    """Weight decay for weights with ndim > 1 only, and layer-wise lr decay (lr_scale per group)."""
    if args.linprobe:  # MAE's linear probe: the head only, no layer decay
        return [{'params': [p for p in model.parameters() if p.requires_grad], 'weight_decay': args.weight_decay}]
    spark = None if args.model in models.vit.FINETUNE_VITS else spark_layer_depths(model)
    if spark is not None:
        return layer_decay_param_groups(model, args.weight_decay, args.layer_decay, *spark)
    grouped = model if args.model in models.vit.FINETUNE_VITS or not hasattr(model, 'group_matcher') \
        else StageGrouping(model)  # ViTs: MAE's per-block decay
    return param_groups_layer_decay(grouped, args.weight_decay, no_weight_decay_list=model.no_weight_decay()
                                    if hasattr(model, 'no_weight_decay') else (), layer_decay=args.layer_decay)


def build_optimizer(args, model):
    groups = build_param_groups(args, model)
    if args.opt == 'lars':  # MAE's LARS: momentum 0.9, trust ratio and decay on ndim > 1 only
        return LARS(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.opt == 'lamb':  # SparK's: the trust ratio on every parameter, no bias correction, (almost) no clipping
        return Lamb(groups, lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=1e7, always_adapt=True,
                    bias_correction=False)
    return torch.optim.AdamW(groups, lr=args.lr, fused=True)


def check_args(args):
    check_flags(args, {'--batch_size': '>= 1', '--epochs': '>= 1', '--accum_iter': '>= 1', '--input_size': '>= 1',
                       '--drop_path': '[0, 1)', '--clip_grad': '>= 0', '--weight_decay': '>= 0', '--lr': '> 0',
                       '--blr': '> 0', '--layer_decay': '(0, 1]', '--min_lr': '>= 0',
                       '--warmup_epochs': '>= 0', '--color_jitter': '>= 0', '--smoothing': '[0, 1)',
                       '--reprob': '[0, 1]', '--recount': '>= 1', '--mixup': '>= 0', '--cutmix': '>= 0',
                       '--mixup_prob': '[0, 1]', '--mixup_switch_prob': '[0, 1]', '--crop_pct': '(0, 1]',
                       '--repeated_aug': '>= 0', '--model_ema_decay': '[0, 1]', '--nb_classes': '>= 1',
                       '--num_workers': '>= 0', '--print_freq': '>= 1', '--save_freq': '>= 1', '--eval_freq': '>= 1',
                       '--max_nonfinite': '>= 0', '--save_every_steps': '>= 0'})
    check_finetune_data_args(args)


def main(args):
    check_args(args)
    device = setup_run(args)
    dataset_val = build_finetune_dataset(False, args)
    val_loader = build_eval_loader(dataset_val, args.batch_size, args.num_workers,
                                   args.pin_mem and torch.cuda.is_available(), args.dist_eval)
    model = build_model(args).to(device)
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f'{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable '
          f'parameters; actual lr {args.lr:.2e}, effective batch size {eff_batch_size}')
    if args.linprobe and args.opt == 'lars' and eff_batch_size < 4096:
        print(f'note: LARS moves each weight by about 0.001 x lr of its norm per step, so at lr {args.lr:.2e} the '
              'probe hardly trains (MAE tuned it at batch 16384, lr 6.4); below batch 4096 use --opt adamw --blr 4e-3 '
              '(docs/learning/README.md), or eval_knn.py --linear for a converged probe')
    amp_dtype = AMP_DTYPES[args.amp]
    if args.eval:
        return evaluate_checkpoint(args, model, val_loader, device, amp_dtype)[0]

    optimizer = build_optimizer(args, model)
    trainer = TrainStep(model, optimizer, device, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)

    def save(epoch, mid_epoch=None, best=False):  # after `epoch`, or inside it (a stop signal, --save_every_steps)
        if args.output_dir:
            extra = {'max_accuracy': max_accuracy, 'ema': ema.state_dict() if ema else None, 'mid_epoch': mid_epoch}
            save_checkpoint(args.output_dir, epoch - (mid_epoch is not None), trainer.num_updates, args, model,
                            optimizer, trainer.scaler, extra=extra, best=best,
                            keep=mid_epoch is None and keeps_checkpoint(epoch, args.save_freq, args.epochs))
    checkpoints = MidEpochCheckpoints(save, args.save_every_steps)
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    ckpt = resume_training(args, path, model, trainer, checkpoints=checkpoints) if path else {}
    check_resumed_split(ckpt.get('args', {}), args)
    ema = ModelEmaHook(model, args.model_ema_decay) if args.model_ema else None  # starts from the loaded weights
    if ema is not None and ckpt.get('extra', {}).get('ema'):
        ema.load_state_dict(ckpt['extra']['ema'])
    max_accuracy = ckpt.get('extra', {}).get('max_accuracy', 0.0)
    if args.compile:
        model.compile()
    attach_ddp(trainer, device)
    train_loader = build_train_loader(build_finetune_dataset(True, args), args.batch_size, args.num_workers,
                                      args.pin_mem, args.seed)
    if args.repeated_aug:
        train_loader = with_repeated_augmentation(train_loader, args.repeated_aug)
    schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
    mixup_fn = build_mixup(args)
    compute_loss = classification_loss(build_criterion(args, mixup_fn), device, mixup_fn)
    log_writer = make_log_writer(args.log_dir)

    print(f'start training for {args.epochs} epochs from epoch {args.start_epoch}')
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_loader, trainer, epoch, schedule, compute_loss, hooks=[ema] if ema else (),
                                      log_writer=log_writer, print_freq=args.print_freq, checkpoints=checkpoints)
        log = {f'train_{k}': v for k, v in train_stats.items()}
        test_stats, best = {}, False
        if evaluates_epoch(epoch, args.eval_freq, args.epochs):
            test_stats = evaluate(val_loader, model, device, amp_dtype)
            log.update({f'test_{k}': v for k, v in test_stats.items()})
            if ema is not None:
                log.update({f'test_ema_{k}': v for k, v in evaluate(val_loader, ema.module, device, amp_dtype).items()})
            best = test_stats['acc1'] > max_accuracy
            max_accuracy = max(max_accuracy, test_stats['acc1'])
            print(f'accuracy of the network on {test_stats["count"]} test images: {test_stats["acc1"]:.1f}% '
                  f'(max {max_accuracy:.2f}%)')
        save(epoch, best=best)
        write_bad_file_list(args.output_dir, train_loader.dataset, dataset_val)
        if log_writer is not None:
            for key in ('acc1', 'acc5', 'loss', 'skipped_files'):
                if key in test_stats:
                    log_writer.add_scalar(f'perf/test_{key}', test_stats[key], epoch)
            log_writer.flush()
        append_log_line(args.output_dir, {**log, 'epoch': epoch, 'max_accuracy': max_accuracy})
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


if __name__ == '__main__':
    run_cli(main, get_args_parser())
