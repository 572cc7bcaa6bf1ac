"""Downstream evaluation of an SCE R3D-18 (main_sce.py, or an official eztorch checkpoint): the three protocols of
the official repository (https://github.com/juliendenize/eztorch, configs/run/{evaluation,finetuning}).

    # linear classifier on the frozen trunk, Kinetics-200 (8 GPUs x 64 clips, lr 2.0 x 512 / 256, 60 epochs)
    torchrun --nproc_per_node=8 run_finetune_video.py --protocol linear --data_path /path/to/kinetics200 \\
        --finetune output/sce_r3d18_k200/checkpoint-last.pth --output_dir output/linear_k200
    # fine-tuning on UCF101 split 1 (8 GPUs x 8 clips, lr 0.1 x 64 / 256, 200 epochs, dropout 0.8, SyncBN)
    torchrun --nproc_per_node=8 run_finetune_video.py --protocol finetune --dataset ucf101 --split 1 \\
        --data_path /path/to/ucf101_frames --finetune ... --output_dir output/finetune_ucf101
    # retrieval (UCF101 or HMDB51): bank = train split, queries = test split, R@1, 5, 10, 15, 20, 25
    python run_finetune_video.py --protocol retrieval --dataset hmdb51 --data_path /path/to/hmdb51_frames ...

Every protocol evaluates 10 temporal clips x 3 spatial crops per video (`--num_clips`, `--num_crops`), softmax
probabilities (features for retrieval) averaged over a video's views. Flags whose default depends on the protocol
are listed in PROTOCOL_DEFAULTS; a flag given on the command line wins. docs/SCE.md lists what differs from the
official code.
"""
import argparse
import datetime
import os
import time

import numpy as np
import torch
from torch import nn

from engine_finetune import classification_loss, evaluate, evaluate_checkpoint
from engine import train_one_epoch
from models.r3d import VideoClassifier, r3d18_trunk
from models.sce import convert_sync_batchnorm
from util.checkpoint import save_checkpoint
from util.cli import add_bool_arg, add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.samplers import build_eval_loader
from util.dist import get_world_size
from util.lr_sched import IterationSchedule, cosine_scheduler
from util.preemption import MidEpochCheckpoints
from util.runtime import (append_log_line, attach_ddp, build_train_loader, evaluates_epoch, keeps_checkpoint,
                          make_log_writer, resume_path, resume_training, run_cli, setup_run)
from util.sce.augment import SCEVideoAugment
from util.train_step import AMP_DTYPES, TrainStep
from util.video.checkpoint import load_r3d_trunk
from util.video.demo import video_data_root
from util.video.eval import (MEAN, RECALL_KS, STD, ViewAveragedClassifier, broadcast_buffers, cached_features,
                             extract_features, file_identity, list_digest, retrieval_recall)
from util.video.splits import DATASETS, NOMINAL_FPS, video_list
from util.video.views import MultiViewDataset, TrainClipDataset

# The official configs per protocol (batch per GPU: 8 GPUs give the official global batches 512 and 64).
PROTOCOL_DEFAULTS = {
    'linear': dict(dataset='kinetics', batch_size=64, epochs=60, warmup_epochs=8, blr=2.0, dropout=0.0,
                   eval_freq=5),
    'finetune': dict(dataset='ucf101', batch_size=8, epochs=200, warmup_epochs=0, blr=0.1, dropout=0.8,
                     eval_freq=50),
    'retrieval': dict(dataset='ucf101', batch_size=8, epochs=0, warmup_epochs=0, blr=0.1, dropout=0.0,
                      eval_freq=1),
}


def train_augmentation(colour=False):
    """The GPU stage of training clips: /255, [colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 in a random order,
    grayscale p 0.2,] horizontal flip p 0.5, normalise; parameters drawn per clip (util/sce/augment.py)."""
    return SCEVideoAugment(0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                           jitter_p=0.8 if colour else 0.0, grayscale_p=0.2 if colour else 0.0, blur_p=0.0,
                           solarize_p=0.0, hflip_p=0.5, mean=(MEAN,) * 3, std=(STD,) * 3)


class VideoEvalArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        for name, value in PROTOCOL_DEFAULTS[parsed.protocol].items():
            if getattr(parsed, name) is None:
                setattr(parsed, name, value)
        if parsed.fps is None:
            parsed.fps = NOMINAL_FPS[parsed.dataset]
        return parsed, rest


def get_args_parser():
    p = VideoEvalArgumentParser('SCE downstream video evaluation', add_help=True)
    p.add_argument('--protocol', required=True, choices=sorted(PROTOCOL_DEFAULTS),
                   help='linear: linear classifier on the frozen trunk; finetune: the whole network; retrieval: '
                        'nearest neighbours of test videos among train videos')
    p.add_argument('--finetune', default='', help="pretrained checkpoint: main_sce.py's, eztorch's or trunk-only; "
                                                  "'' = random initialisation (a baseline)")
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default=None, choices=DATASETS, help='default: kinetics (linear), ucf101 (others)')
    g.add_argument('--split', default=1, type=int, choices=[1, 2, 3], help='UCF101 / HMDB51 split')
    g.add_argument('--data_path', default=None,
                   help="frame folders (and Kinetics' train.csv / val.csv), or 'demo' (Kinetics-style)")
    g.add_argument('--split_dir', default=None, help='folder of the UCF101 / HMDB51 split files (default --data_path)')
    g.add_argument('--decoder', default='frame', choices=['frame', 'video'],
                   help='frame: JPEG frame folders; video: video files decoded with torchcodec')
    g.add_argument('--fps', default=None, type=int, help='frames per second of the frame folders (default: '
                                                         'UCF101 25, others 30)')
    g.add_argument('--num_frames', default=8, type=int, help='frames per clip, uniformly over --clip_duration')
    g.add_argument('--clip_duration', default=2.56, type=float, help='seconds per clip')
    g.add_argument('--train_crop_size', default=224, type=int)
    g.add_argument('--train_short_side', default=[256, 320], type=int, nargs=2, metavar=('MIN', 'MAX'),
                   help='training clips: short side resized to a random integer in [MIN, MAX], then a random crop')
    g.add_argument('--eval_crop_size', default=256, type=int, help='test views: short side resized to this, crops '
                                                                    'of this size')
    g.add_argument('--num_clips', default=10, type=int, help='temporal clips per test video')
    g.add_argument('--num_crops', default=3, type=int, choices=[1, 3], help='spatial crops per clip')
    g.add_argument('--num_threads_io', default=4, type=int)
    g.add_argument('--num_threads_decode', default=4, type=int)
    g.add_argument('--num_workers', default=8, type=int)
    g = p.add_argument_group('training')
    g.add_argument('--batch_size', default=None, type=int, help='clips per GPU (linear 64, finetune 8)')
    g.add_argument('--eval_batch_size', default=2, type=int, help='test videos per GPU (x views clips)')
    g.add_argument('--accum_iter', default=1, type=int)
    g.add_argument('--epochs', default=None, type=int, help='linear 60, finetune 200')
    g.add_argument('--warmup_epochs', default=None, type=int, help='linear 8, finetune 0')
    g.add_argument('--blr', default=None, type=float,
                   help='initial lr, scaled to the global batch: lr = blr x batch / 256 (linear 2.0, finetune 0.1)')
    g.add_argument('--lr', default=None, type=float, help='absolute lr (overrides --blr)')
    g.add_argument('--min_lr', default=0.0, type=float)
    g.add_argument('--momentum', default=0.9, type=float)
    g.add_argument('--weight_decay', default=0.0, type=float)
    g.add_argument('--dropout', default=None, type=float, help='before the linear layer (linear 0, finetune 0.8)')
    g.add_argument('--clip_grad', default=None, type=float)
    g.add_argument('--eval_freq', default=None, type=int,
                   help='validate every N epochs and after the last (linear 5, finetune 50)')
    add_bool_arg(g, '--sync_bn', True, 'fine-tuning under DDP on CUDA: SyncBatchNorm')
    g.add_argument('--grad_ckpt', action='store_true', help='recompute the trunk\'s activations in the backward pass')
    g.add_argument('--amp', default='none', choices=sorted(AMP_DTYPES), help='autocast dtype (official: fp32)')
    g.add_argument('--ks', default=list(RECALL_KS), type=int, nargs='+', help='retrieval: recall at these k')
    add_bool_arg(g, '--dist_eval', True, 'under DDP each rank evaluates its share of the videos (each once)')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='./output/sce_downstream')
    g.add_argument('--log_dir', default=None, help='TensorBoard folder (default <output_dir>/tensorboard)')
    g.add_argument('--eval', action='store_true', help='only evaluate the --resume checkpoint (or the newest one)')
    add_resume_flags(g)
    g.add_argument('--print_freq', default=20, type=int)
    g.add_argument('--save_freq', default=50, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    add_run_flags(g, seed=42)
    add_launcher_flags(g)
    return p


def check_args(args):
    if not args.data_path:
        raise ValueError('--data_path is required: the frame folders of the data set, or demo')
    check_flags(args, {'--batch_size': '>= 1', '--eval_batch_size': '>= 1', '--accum_iter': '>= 1',
                       '--epochs': '>= 0', '--warmup_epochs': '[0, --epochs]', '--blr': '> 0', '--lr': '> 0',
                       '--min_lr': '>= 0', '--momentum': '[0, 1)', '--weight_decay': '>= 0', '--dropout': '[0, 1)',
                       '--clip_grad': '>= 0', '--eval_freq': '>= 1', '--fps': '>= 1', '--num_frames': '>= 1',
                       '--clip_duration': '> 0', '--train_crop_size': '>= 1', '--eval_crop_size': '>= 1',
                       '--num_clips': '>= 1', '--num_threads_io': '>= 0', '--num_threads_decode': '>= 0',
                       '--num_workers': '>= 0', '--max_nonfinite': '>= 0', '--ks': '>= 1', '--print_freq': '>= 1',
                       '--save_freq': '>= 1', '--save_every_steps': '>= 0'})
    if args.protocol != 'retrieval' and not args.eval and args.epochs < 1:
        raise ValueError(f'--epochs {args.epochs}: the {args.protocol} protocol trains for at least one epoch')
    if not args.train_crop_size <= args.train_short_side[0] <= args.train_short_side[1]:
        raise ValueError(f'--train_short_side {args.train_short_side}: need --train_crop_size '
                         f'({args.train_crop_size}) <= MIN <= MAX')
    if args.dataset == 'kinetics' and args.split != 1:
        raise ValueError('--split: Kinetics has one split (train.csv / val.csv); drop --split')
    if args.finetune and not os.path.isfile(args.finetune):
        raise FileNotFoundError(f'--finetune {args.finetune}: no such checkpoint file')
    if str(args.data_path) == 'demo' and args.dataset != 'kinetics':
        raise ValueError('--data_path demo holds Kinetics-style videos (train.csv, val.csv): use --dataset kinetics')


def load_video_lists(args):
    """(train, test) VideoLists; Kinetics tests on val, UCF101 / HMDB51 on the split's test list."""
    root = video_data_root(args.data_path, args.decoder)
    return [video_list(args.dataset, root, args.split, train, args.decoder, args.split_dir) for train in (True, False)]


def video_kwargs(args):
    return dict(decoder=args.decoder, fps=args.fps, num_frames=args.num_frames, clip_duration=args.clip_duration,
                num_threads_io=args.num_threads_io, num_threads_decode=args.num_threads_decode)


def multi_view_dataset(args, videos, return_index=False):
    return MultiViewDataset(videos, crop_size=args.eval_crop_size, num_clips=args.num_clips,
                            num_crops=args.num_crops, return_index=return_index, **video_kwargs(args))


def build_trunk(args, pretrained=True):
    with torch.random.fork_rng(devices=[]):  # the same random init on every rank (seeds are per rank)
        torch.manual_seed(args.seed)
        trunk = r3d18_trunk()
    if not pretrained:  # --eval: the checkpoint replaces every weight
        return trunk
    if args.finetune:
        load_r3d_trunk(trunk, args.finetune)
        print(f'trunk loaded from {args.finetune}')
    else:
        print("--finetune '': randomly initialised trunk (a baseline)")
    return trunk


def build_model(args, num_classes):
    model = VideoClassifier(build_trunk(args, pretrained=not args.eval), num_classes, args.dropout,
                            freeze_trunk=args.protocol == 'linear')
    if args.grad_ckpt:
        model.trunk.set_grad_checkpointing(True)
    return model


def main(args):
    check_args(args)
    train_videos, test_videos = load_video_lists(args)
    device = setup_run(args)
    args.log_dir = args.log_dir or (os.path.join(args.output_dir, 'tensorboard') if args.output_dir else None)
    print(f'{args.dataset} split {args.split}: {len(train_videos)} train and {len(test_videos)} test videos, '
          f'{len(train_videos.classes)} classes; test views {args.num_clips} clips x {args.num_crops} crops')
    if args.protocol == 'retrieval':
        return retrieval(args, device, train_videos, test_videos)
    return classification(args, device, train_videos, test_videos)


def classification(args, device, train_videos, test_videos):
    """Linear evaluation or fine-tuning; validation (view-averaged, on the test split) every --eval_freq epochs
    and after the last one, which is the result (`test_acc1` in log.txt); the best is kept too."""
    num_classes = max(len(train_videos.classes), *(label + 1 for _, label, _ in train_videos.items + test_videos.items))
    val_set = multi_view_dataset(args, test_videos)
    val_loader = build_eval_loader(val_set, args.eval_batch_size, args.num_workers,
                                   args.pin_mem and torch.cuda.is_available(), args.dist_eval)
    model = build_model(args, num_classes).to(device)
    if args.protocol == 'finetune' and args.sync_bn:
        model = convert_sync_batchnorm(model)
    evaluator = ViewAveragedClassifier(model)
    amp_dtype = AMP_DTYPES[args.amp]
    if args.eval:
        return evaluate_checkpoint(args, model, val_loader, device, amp_dtype, classifier=evaluator)[0]
    world = get_world_size()
    eff_batch_size = args.batch_size * args.accum_iter * world
    args.lr = args.lr or args.blr * eff_batch_size / 256
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    trainer = TrainStep(model, optimizer, device, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)
    print(f'{args.protocol}: {sum(p.numel() for p in trainable) / 1e6:.3f}M trainable parameters, lr {args.lr:.4g} '
          f'(batch {eff_batch_size} = {world} x {args.batch_size} x {args.accum_iter})')

    def save(epoch, mid_epoch=None, best=False):
        if args.output_dir:
            save_checkpoint(args.output_dir, epoch - (mid_epoch is not None), trainer.num_updates, args, model,
                            optimizer, trainer.scaler, extra={'best_acc1': best_acc1, 'mid_epoch': mid_epoch},
                            best=best, keep=mid_epoch is None and keeps_checkpoint(epoch, args.save_freq, args.epochs))
    checkpoints = MidEpochCheckpoints(save, args.save_every_steps)
    path = resume_path(args.resume, args.auto_resume, args.output_dir)
    ckpt = resume_training(args, path, model, trainer, checkpoints=checkpoints) if path else {}
    best_acc1 = ckpt.get('extra', {}).get('best_acc1', -1.0)
    attach_ddp(trainer, device)
    train_set = TrainClipDataset(train_videos, crop_size=args.train_crop_size, short_side=args.train_short_side,
                                 **video_kwargs(args))
    train_loader = build_train_loader(train_set, args.batch_size, args.num_workers, args.pin_mem, args.seed)
    steps_per_epoch = len(train_loader) // args.accum_iter
    lrs = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    schedule = IterationSchedule(lrs, np.full_like(lrs, args.weight_decay), len(train_loader), args.accum_iter)
    augment = train_augmentation(colour=args.protocol == 'finetune')
    loss = classification_loss(nn.CrossEntropyLoss(), device)
    compute_loss = lambda model, clips, labels: loss(model, augment(clips), labels)  # noqa: E731
    log_writer = make_log_writer(args.log_dir)

    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(train_loader, trainer, epoch, schedule, compute_loss, (), log_writer,
                                args.print_freq, checkpoints)
        log = {f'train_{k}': v for k, v in stats.items()}
        last, is_best = epoch + 1 == args.epochs, False
        if evaluates_epoch(epoch, args.eval_freq, args.epochs):
            broadcast_buffers(model)
            val = evaluate(val_loader, evaluator, device, amp_dtype, print_freq=args.print_freq)
            is_best, best_acc1 = val['acc1'] > best_acc1, max(best_acc1, val['acc1'])
            log.update({f'val_{k}': v for k, v in val.items()}, best_val_acc1=best_acc1)
            if last:  # the protocols validate and test on the same split: the last epoch's result is the one
                log.update(test_acc1=val['acc1'], test_acc5=val['acc5'])
            print(f"epoch {epoch}: video top-1 {val['acc1']:.2f}% top-5 {val['acc5']:.2f}% on {val['count']} "
                  f"videos (best top-1 {best_acc1:.2f}%)")
            if log_writer is not None:
                for key in ('acc1', 'acc5', 'loss'):
                    log_writer.add_scalar(f'val/{key}', val[key], epoch)
        save(epoch, best=is_best)
        write_bad_file_list(args.output_dir, train_set, val_set)
        if log_writer is not None:
            log_writer.flush()
        append_log_line(args.output_dir, {**log, 'epoch': epoch, 'step': trainer.num_updates})
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def retrieval(args, device, train_videos, test_videos):
    """Features of the bank (train split) and the queries (test split), cached in --output_dir; R@k."""
    trunk = []  # built on the first cache miss only

    def features_of(videos, name):
        dataset = multi_view_dataset(args, videos, return_index=True)
        loader = build_eval_loader(dataset, args.eval_batch_size, args.num_workers,
                                   args.pin_mem and torch.cuda.is_available(), args.dist_eval)
        key = dict(checkpoint=file_identity(args.finetune), seed=None if args.finetune else args.seed,
                   videos=list_digest(videos.items), num_videos=len(videos), decoder=args.decoder, fps=args.fps,
                   num_frames=args.num_frames, clip_duration=args.clip_duration, crop=args.eval_crop_size,
                   num_clips=args.num_clips, num_crops=args.num_crops)

        def compute():
            if not trunk:
                trunk.append(build_trunk(args).to(device))
            features, counts = extract_features(loader, trunk[0], device, len(videos), args.print_freq)
            dataset.bad_files.count()  # every rank learns the others' unreadable videos
            return {'features': features, 'counts': counts, 'labels': torch.tensor(dataset.labels)}
        path = os.path.join(args.output_dir, f'features_{name}.pth') if args.output_dir else None
        result = cached_features(path, key, compute)
        write_bad_file_list(args.output_dir, dataset)
        if (result['counts'] > 1).any():
            raise RuntimeError(f'{name}: some videos were extracted more than once')
        kept = result['counts'] == 1
        if not kept.all():
            print(f'{name}: {int((~kept).sum())} unreadable videos left out')
        return result['features'][kept], result['labels'][kept]

    bank, bank_labels = features_of(train_videos, 'bank')
    queries, query_labels = features_of(test_videos, 'queries')
    recall = retrieval_recall(queries, query_labels, bank, bank_labels, args.ks)
    print(f'retrieval on {args.dataset} split {args.split}, {len(queries)} queries, bank of {len(bank)}: '
          + '  '.join(f'R@{k} {v:.2f}%' for k, v in recall.items()))
    log_writer = make_log_writer(args.log_dir)
    if log_writer is not None:
        for k, v in recall.items():
            log_writer.add_scalar(f'retrieval/R@{k}', v, 0)
        log_writer.close()
    append_log_line(args.output_dir, {**{f'R@{k}': v for k, v in recall.items()}, 'queries': len(queries),
                                      'bank': len(bank)})
    return recall


if __name__ == '__main__':
    run_cli(main, get_args_parser())
