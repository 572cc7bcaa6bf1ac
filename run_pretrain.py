"""LocalMIM pretraining of ViTs with multi-scale HOG targets, optionally with FreezeOut (--how_scale, --t_0).

    python run_pretrain.py --data_path demo --model MIM_vit_tiny_patch16 ...      # one process
    torchrun --nproc_per_node=8 run_pretrain.py --batch_size 256 --model MIM_vit_base_patch16 ...
    python -m torch.distributed.launch --nproc_per_node=8 run_pretrain.py ...    # also srun on SLURM

Flags and defaults are the official ones; see README.md for what differs and why.
"""
import argparse
import datetime
import time

import timm
import torch
from timm.optim import param_groups_weight_decay

import models  # noqa: F401  (registers the models with timm)
from engine import masked_modeling_loss, train_one_epoch
from util.checkpoint import read_checkpoint, save_checkpoint
from util.cli import add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.datasets import ImageFolderOrFlat, build_pretrain_dataset
from util.data.fast_image import FAST_DATA_MODES, DeviceInput
from util.data.vis_batch import fixed_vis_batch, vis_transform
from util.dist import all_reduce_sum, get_world_size, is_main_process
from util.freezeout.cache import FixedViews, FrozenPrefixCache
from util.freezeout.feature_masking import FeatureMasking, SwitchableViews
from util.freezeout.schedule import FreezeOut, FreezeOutSchedule, prune_decoders, pruned_stages
from util.knn import KnnMonitor
from util.localmim.vis import save_mim_pictures
from util.lr_sched import WarmupCosine
from util.preemption import MidEpochCheckpoints
from util.runtime import (append_log_line, attach_ddp, build_train_loader, keeps_checkpoint, make_log_writer,
                          resume_path, resume_training, run_cli, setup_run)
from util.train_step import TrainStep


def get_args_parser():
    parser = argparse.ArgumentParser('LocalMIM pre-training', add_help=True)
    parser.add_argument('--batch_size', default=128, type=int,
                        help='batch size per GPU (effective batch = batch_size * accum_iter * # GPUs)')
    parser.add_argument('--epochs', default=400, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='accumulate gradients over this many iterations (larger effective batch)')

    parser.add_argument('--model', default='MIM_vit_base_patch16', type=str, metavar='MODEL',
                        help='name of the model to train (MIM_vit_{tiny,small,base,large}_patch16, '
                             'MIM_vit_huge_patch14)')
    parser.add_argument('--input_size', default=224, type=int, help='image input size')
    parser.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of the patches that are masked')
    parser.add_argument('--hog_nbins', default=9, type=int, help='number of orientation bins of the HOG targets')
    parser.add_argument('--hog_bias', action='store_true', help='give the HOG gradient filters a (frozen) bias')

    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='absolute learning rate')
    parser.add_argument('--blr', type=float, default=1e-3, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=float, default=1e-6, metavar='LR', help='lower lr bound for cosine')
    parser.add_argument('--warmup_epochs', type=int, default=40, metavar='N', help='epochs to warm up LR')
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                        help='clip the gradient norm (default: no clipping, as official)')
    parser.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                        help='autocast dtype (default: bf16 on GPU, none on CPU; official: fp16)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--grad_ckpt', action='store_true',
                        help='recompute activations in the backward pass (activation checkpointing): much less '
                             'memory for ~30%% more compute')
    parser.add_argument('--how_scale', default=None, choices=['linear', 'squared', 'cubic'],
                        help='FreezeOut: freeze units front to back at t_i = scale(t_0 + (1 - t_0) i / L) '
                             'of the post-warmup run (default: no freezing)')
    parser.add_argument('--t_0', type=float, default=0.8,
                        help='FreezeOut: pre-scaling freeze time of the first unit (1: baseline, nothing freezes)')
    parser.add_argument('--scale_lr', action='store_true', help='FreezeOut: peak lr of unit i is lr / t_i')
    parser.add_argument('--non_layerwise_lr', action='store_true',
                        help='FreezeOut: keep the global warmup + cosine and freeze abruptly at t_i')
    parser.add_argument('--freezeout_wd', type=float, default=None,
                        help='FreezeOut: weight decay of the decayed groups (default: --weight_decay, as LocalMIM); '
                             '1e-5 reproduces the ViTFreeze runs')
    parser.add_argument('--freeze_cache', action='store_true',
                        help='FreezeOut: reuse frozen-prefix outputs per sample; fixes each sample\'s crop, flip '
                             'and mask for the whole run (that is what makes reuse exact)')
    parser.add_argument('--freeze_cache_dir', default=None, help='keep the cache in this folder (default: memory)')
    parser.add_argument('--freeze_cache_gb', type=float, default=8.0, help='size limit of the cache')
    parser.add_argument('--feature_masking', action='store_true',
                        help='FreezeOut experiment (docs/FREEZEOUT.md): store the frozen prefix\'s features of the UNMASKED '
                             'image once per sample and depth (storage as --freeze_cache), mask them afresh each step; '
                             'masked content leaks into the visible features')
    parser.add_argument('--feature_target', default='hog', choices=['hog', 'features', 'both'],
                        help='--feature_masking: active stages predict HOG, the stored features of the masked tokens, '
                             'or both (sum)')
    parser.add_argument('--sampler', default='auto', choices=['auto', 'standard', 'rank_sticky'],
                        help='how samples are spread over processes: standard (a new split every epoch, as the official '
                             'code) or rank_sticky (each sample on one process for the whole run, so the per-process '
                             'caches of --freeze_cache / --feature_masking keep hitting; each epoch reshuffles within '
                             'a process). auto: rank_sticky with those caches, else standard')
    parser.add_argument('--decoder_prune', action='store_true',
                        help='FreezeOut: remove the decoders (and HOG heads) of frozen stages from the model')

    parser.add_argument('--data_path', default='./dataset/ImageNet/train/', type=str,
                        help="'demo', a folder with train/ inside, a folder of class folders, or of images")
    parser.add_argument('--fast_data', default='none', nargs='?', const='cpu', choices=FAST_DATA_MODES,
                        help='faster loading, same augmentation (docs/PERFORMANCE.md): cpu = uint8 crops cut '
                             'while decoding, normalised on the device; cpu_draft = also decode large JPEGs at '
                             'reduced scale (other pixels); device = decode and crop on the GPU (nvJPEG)')
    parser.add_argument('--output_dir', default='./output/MAE_ViT_B', help='where to save checkpoints and log.txt')
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (none if not given)')
    add_resume_flags(parser, no_auto_resume=True)
    parser.add_argument('--num_workers', default=12, type=int)
    parser.add_argument('--print_freq', default=50, type=int, help='progress line every N steps')
    parser.add_argument('--save_freq', default=50, type=int,
                        help='keep checkpoint-<epoch>.pth every N epochs (checkpoint-last.pth is written every epoch)')
    parser.add_argument('--vis_freq', default=20, type=int, help='reconstruction pictures every N epochs (0: never)')
    parser.add_argument('--knn_every', default=0, type=int, metavar='N',
                        help='every N epochs and after the last, k-NN accuracy of the frozen features (mean patch '
                             'token), neighbours from --data_path train/, scored on its val/ (0: never)')
    parser.add_argument('--knn_k', default=20, type=int, help='neighbours of the k-NN monitor')
    parser.add_argument('--knn_train_images', default=10000, type=int, metavar='N',
                        help='training images the k-NN monitor draws (--seed) as neighbours (0: all)')

    add_run_flags(parser, pin_mem='flags')
    add_launcher_flags(parser, world_size=True)
    return parser


def build_model(args):
    available = timm.list_models('MIM_*')
    if args.model not in available:
        raise ValueError(f'unknown --model {args.model}; available: {", ".join(available)}')
    model = timm.create_model(args.model, img_size=args.input_size, hog_nbins=args.hog_nbins, hog_bias=args.hog_bias)
    model.set_grad_checkpointing(args.grad_ckpt)
    if args.feature_masking:
        model.add_feature_heads(args.feature_target)
    return model


def build_schedule(args, model):
    """The lr schedule (and FreezeOut, which also freezes units) with the optimizer's param groups."""
    if not args.how_scale:
        schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
        return schedule, param_groups_weight_decay(model, args.weight_decay)
    schedule = FreezeOutSchedule(len(model.blocks) + 1, args.how_scale, args.t_0, args.epochs, args.warmup_epochs,
                                 args.lr, args.min_lr, args.scale_lr, layerwise=not args.non_layerwise_lr)
    freezeout = FreezeOut(model, schedule, prune=args.decoder_prune)
    print('FreezeOut freeze epochs: ' + ', '.join(f'{at:.2f}' for at, t in zip(schedule.freeze_at, schedule.t) if t < 1))
    return freezeout, freezeout.param_groups(args.weight_decay if args.freezeout_wd is None else args.freezeout_wd)


def refreezer(path, trainer, schedule):
    """`before_optimizer` of a resume: a FreezeOut optimizer state was saved without the frozen units' groups."""
    def refreeze(ckpt):
        frozen = ckpt.get('extra', {}).get('frozen_units', 0)
        if frozen and not isinstance(schedule, FreezeOut):
            raise ValueError(f'{path} was trained with FreezeOut ({frozen} frozen units): resume it with the '
                             f'same --how_scale and --t_0')
        if frozen:
            schedule.freeze(trainer.optimizer, frozen)
    return refreeze


def monitor_knn(knn, model, device, epoch, log_writer):
    model.eval()
    top1 = knn(model.pooled_features, device)
    model.train()
    print(f'epoch {epoch}: {knn.k}-NN top-1 {top1:.2f}% (frozen features, val split)')
    if log_writer is not None:
        log_writer.add_scalar('knn/top1', top1, epoch)
    return top1


def check_args(args):
    check_flags(args, {'--batch_size': '>= 1', '--epochs': '>= 1', '--accum_iter': '>= 1', '--input_size': '>= 1',
                       '--mask_ratio': '(0, 1)', '--hog_nbins': '>= 1', '--weight_decay': '>= 0', '--lr': '> 0',
                       '--blr': '> 0', '--min_lr': '>= 0', '--warmup_epochs': '>= 0', '--clip_grad': '>= 0',
                       '--t_0': '(0, 1]', '--freeze_cache_gb': '> 0', '--max_nonfinite': '>= 0',
                       '--num_workers': '>= 0', '--print_freq': '>= 1', '--save_freq': '>= 1',
                       '--save_every_steps': '>= 0', '--vis_freq': '>= 0',
                       '--knn_every': '>= 0', '--knn_k': '>= 1', '--knn_train_images': '>= 0'})
    for flag in ('freeze_cache', 'feature_masking', 'decoder_prune'):
        if getattr(args, flag) and not args.how_scale:
            raise ValueError(f'--{flag} works on frozen FreezeOut units: give --how_scale too')
    if args.freeze_cache and args.feature_masking:
        raise ValueError('--freeze_cache and --feature_masking are two different caches: give one of them')
    if args.feature_target != 'hog' and not args.feature_masking:
        raise ValueError(f'--feature_target {args.feature_target} predicts stored features: give --feature_masking')
    if args.freezeout_wd is not None and (not args.how_scale or args.freezeout_wd < 0):
        raise ValueError(f'--freezeout_wd {args.freezeout_wd}: a weight decay >= 0 for FreezeOut runs '
                         f'(with --how_scale); without FreezeOut use --weight_decay')


def store_counts(store):
    return torch.tensor([store.hits, store.advanced, store.misses] if store else [0, 0, 0], dtype=torch.float64)


def all_processes_sum(values):
    all_reduce_sum(values)
    return [int(v) for v in values.tolist()]


def main(args):
    check_args(args)
    device = setup_run(args)
    dataset = build_pretrain_dataset(args.data_path, args.input_size, args.fast_data)
    views = (SwitchableViews if args.feature_masking else FixedViews)(dataset, args.seed)
    cached = args.freeze_cache or args.feature_masking
    sticky = args.sampler == 'rank_sticky' or (args.sampler == 'auto' and cached)
    loader = build_train_loader(views if cached else dataset, args.batch_size, args.num_workers, args.pin_mem,
                                args.seed, rank_sticky=sticky)
    model = build_model(args).to(device)
    print(f'{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable '
          f'parameters; {len(dataset)} images from {dataset.root}')

    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f'base lr: {args.lr * 256 / eff_batch_size:.2e}  actual lr: {args.lr:.2e}  accumulate grad iterations: '
          f'{args.accum_iter}  effective batch size: {eff_batch_size}')
    schedule, param_groups = build_schedule(args, model)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    trainer = TrainStep(model, optimizer, device, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)
    cache_bytes = int(args.freeze_cache_gb * 2 ** 30)
    # before any freeze (a resume's) and before DDP: its freeze callback runs ahead of the re-wrap
    masking = FeatureMasking(schedule, args.mask_ratio, cache_bytes, args.freeze_cache_dir) if args.feature_masking \
        else None

    def save(epoch, mid_epoch=None):  # after `epoch`, or inside it (a stop signal, --save_every_steps)
        if args.output_dir:
            extra = {'frozen_units': model.frozen_units, 'mid_epoch': mid_epoch, 'pruned_stages': pruned_stages(model)}
            save_checkpoint(args.output_dir, epoch - (mid_epoch is not None), trainer.num_updates, args, model,
                            optimizer, trainer.scaler, extra=extra,
                            keep=mid_epoch is None and keeps_checkpoint(epoch, args.save_freq, args.epochs))
    checkpoints = MidEpochCheckpoints(save, args.save_every_steps)
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    if path:  # a checkpoint written after --decoder_prune lacks the pruned decoders: prune them here first
        prune_decoders(model, read_checkpoint(path, mmap=True).get('extra', {}).get('pruned_stages', []))
        resume_training(args, path, model, trainer, refreezer(path, trainer, schedule), checkpoints)
    if args.compile:
        if args.how_scale:  # each freeze changes requires_grad and the no-grad prefix: one recompile each
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(model.blocks))
        model.compile()
    attach_ddp(trainer, device, schedule)
    cache = FrozenPrefixCache(model, args.seed, cache_bytes, args.freeze_cache_dir) if args.freeze_cache else None
    compute_loss = cache.compute_loss(args.mask_ratio) if cache else masked_modeling_loss(args.mask_ratio)
    if masking:
        compute_loss = masking.compute_loss
    if args.fast_data != 'none':  # the loader gives uint8 (or encoded) crops: normalise them on the device
        compute_loss = DeviceInput(args.input_size, device).wrap(compute_loss)
    log_writer = make_log_writer(args.log_dir)
    knn = KnnMonitor(args.data_path, args.input_size, args.knn_every, args.knn_k, args.knn_train_images,
                     num_workers=args.num_workers, seed=args.seed) if args.knn_every else None
    vis_imgs, vis_noise = fixed_vis_batch(ImageFolderOrFlat(dataset.root, vis_transform(args.input_size)),
                                          num_patches=model.grid_size ** 2)

    print(f'start training for {args.epochs} epochs from epoch {args.start_epoch}')
    start_time = time.time()
    store = cache or masking
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        if masking:
            masking.start_epoch(views, epoch)
        counts = store_counts(store)
        stats = train_one_epoch(loader, trainer, epoch, schedule, compute_loss, log_writer=log_writer,
                                print_freq=args.print_freq, checkpoints=checkpoints)
        if store:  # samples of this epoch over all processes: served as stored, carried on from a shallower depth,
            stats.update(zip(('store_hits', 'store_advanced', 'store_misses'),  # or computed from the image
                             all_processes_sum((store_counts(store) - counts).to(device))))
        last = epoch + 1 == args.epochs
        save(epoch)
        write_bad_file_list(args.output_dir, dataset)
        if is_main_process() and args.vis_freq and (epoch % args.vis_freq == 0 or last):
            save_mim_pictures(model, vis_imgs.to(device), vis_noise.to(device), args.output_dir, epoch, log_writer)
        if knn and knn.due(epoch, last) and is_main_process():
            stats['knn_top1'] = monitor_knn(knn, model, device, epoch, log_writer)
        epoch_time = stats.pop('epoch_time')
        append_log_line(args.output_dir, {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch,
                                          'epoch_time': epoch_time, 'skipped_steps': int(trainer.skipped),
                                          'active_units': len(model.blocks) + 1 - model.frozen_units})
        if log_writer is not None:
            log_writer.flush()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


if __name__ == '__main__':
    run_cli(main, get_args_parser())
