"""SparK masked pretraining of timm CNNs, with the official flags and defaults
(https://github.com/keyu-tian/SparK/blob/main/pretrain/utils/arg_util.py).

    python main_spark.py --exp_name=demo --data_path=demo --model=resnet18 --bs=8 --input_size=64
    python -m torch.distributed.launch --nproc_per_node=8 main_spark.py --exp_name=<name> \\
        --data_path=/path/to/imagenet --model=resnet50 --bs=512          # or torchrun --nnodes ...

`--bs` is the GLOBAL batch (per process and micro-step: bs // (world size * accum_iter)); lr = base_lr * bs
/ 256. Booleans take `--sbn=False` like the official Tap parser. Outputs go to `--exp_dir` (default
`output_<exp_name>/`) under the official file names (util/spark/checkpoint.py); README.md lists them and what
differs from the official code.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import Lamb
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from engine import train_one_epoch
from models.spark import build_spark, spark_default_drop_path
from util.checkpoint import read_checkpoint
from util.cli import add_bool_arg, add_launcher_flags, add_resume_flags, add_run_flags, check_flags
from util.data.bad_files import write_bad_file_list
from util.data.datasets import ImageFolderOrFlat, resolve_image_root
from util.data.vis_batch import fixed_vis_batch, vis_transform
from util.dist import get_world_size, is_main_process
from util.preemption import MidEpochCheckpoints
from util.runtime import (attach_ddp, build_train_loader, make_log_writer, per_process_batch, resume_path, run_cli,
                          setup_run, tee_console)
from util.spark.checkpoint import latest_spark_checkpoint, resume_spark, save_spark_outputs
from util.spark.schedule import SparkSchedule, spark_param_groups
from util.spark.vis import save_spark_pictures
from util.train_step import TrainStep

REPO = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = argparse.ArgumentParser('SparK pre-training', add_help=True)
    # environment
    p.add_argument('--exp_name', default='your_exp_name', type=str)
    p.add_argument('--exp_dir', default=None, type=str, help='output folder (default: output_<exp_name>)')
    p.add_argument('--data_path', default='imagenet_data_path', type=str,
                   help="'demo', an ImageNet folder (train/ inside), a folder of class folders or of images")
    p.add_argument('--init_weight', default='', type=str, help='load model weights only (strict=False)')
    p.add_argument('--resume_from', default='', type=str,
                   help='a <model>_still_pretraining.pth or an official *_spark_style.pth to resume')
    # SparK / encoder
    p.add_argument('--mask', default=0.6, type=float, help='mask ratio')
    p.add_argument('--model', default='resnet50', type=str)
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--dec_width', default=768, type=int,
                   help='decoder width (the official 768; channels halve per upsampling block, e.g. 64 for a small CNN)')
    add_bool_arg(p, '--sbn', True, 'SyncBatchNorm (forced False when not distributed)')
    # data
    p.add_argument('--bs', default=4096, type=int, help='GLOBAL batch size')
    p.add_argument('--dataloader_workers', '--num_workers', dest='num_workers', default=8, type=int)
    # optimization
    p.add_argument('--dp', default=0.0, type=float,
                   help='drop path rate; 0 (the default) means the official rate of --model (e.g. 0.05 for resnet50, '
                        '0.2 for convnext_small), as in the official code, where --dp 0 cannot turn drop path off')
    p.add_argument('--base_lr', default=2e-4, type=float, help='lr = base_lr * bs / 256')
    p.add_argument('--wd', default=0.04, type=float, help='initial weight decay')
    p.add_argument('--wde', default=0.2, type=float, help='final weight decay (0: = wd)')
    p.add_argument('--ep', default=1600, type=int)
    p.add_argument('--wp_ep', default=40, type=int)
    p.add_argument('--clip', default=5, type=int, help='grad-norm clip for sgd/adamw (<= 0: none); LAMB clips at 5')
    p.add_argument('--opt', default='lamb', choices=['sgd', 'adamw', 'lamb'])
    p.add_argument('--ada', default=0.0, type=float,
                   help='beta2 of LAMB / AdamW; 0: 0.999 for ConvNeXts, else 0.95 (officially only ResNets get 0.95 '
                        'and any other model keeps beta2 0)')
    p.add_argument('--lr', default=None, type=float, help='overwritten by base_lr * bs / 256 (as official)')
    # ours
    p.add_argument('--amp', default='none', choices=['bf16', 'fp16', 'none'], help='default fp32 like official')
    p.add_argument('--accum_iter', default=1, type=int, help='micro-steps per optimizer step (same --bs, less memory)')
    add_bool_arg(p, '--grad_ckpt', False, 'activation checkpointing of the encoder and decoder blocks: same '
                 'results, less memory, slower steps')
    p.add_argument('--vis_freq', default=20, type=int, help='reconstruction pictures every N epochs (0: never)')
    p.add_argument('--print_freq', default=100, type=int)
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: <exp_dir>/tensorboard_log)')
    add_run_flags(p, max_nonfinite=False)
    add_resume_flags(p, resume=False, start_epoch=False)
    add_launcher_flags(p, dist_on_itp=None)
    return p


def exp_dir_of(args):
    path = args.exp_dir or f'output_{args.exp_name}'
    head, base = os.path.split(os.path.normpath(path))
    return os.path.join(head, re.sub(r'[^0-9a-zA-Z\-]', '_', base))


def data_root(data_path):
    if str(data_path) not in ('demo', 'fashion-mnist'):
        path = os.path.normpath(os.path.expanduser(str(data_path)))
        if os.path.basename(path) in ('train', 'val'):
            data_path = os.path.dirname(path)
    return resolve_image_root(data_path, 'train')


def spark_transform(input_size):
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.67, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def git_info():
    def git(*cmd):
        try:
            return subprocess.run(['git', *cmd], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return '[unknown]'
    return git('rev-parse', 'HEAD'), git('log', '-1', '--format=%s')


def build_optimizer(args, model):
    groups = spark_param_groups(model)
    if args.opt == 'sgd':
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    if args.opt == 'adamw':
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.ada), weight_decay=0.0)
    # timm Lamb: global L2 grad norm > max_grad_norm -> every grad scaled by max_grad_norm / norm
    return Lamb(groups, lr=args.lr, betas=(0.9, args.ada), weight_decay=0.0, max_grad_norm=5.0)


def build_trainer(args, model, optimizer, device):
    """TrainStep with the official clipping: LAMB clips the global grad norm at 5 inside its step; SGD and AdamW
    clip at --clip, and only when --clip > 0."""
    clip = float(args.clip) if args.opt != 'lamb' and args.clip > 0 else None
    return TrainStep(model, optimizer, device, args.amp, args.accum_iter, clip, max_nonfinite=1)


def log_line(path, obj, blank=False):
    if is_main_process():
        with open(path, 'a') as f:
            f.write(json.dumps(obj) + '\n' + ('\n' if blank else ''))


def fmt_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def resolve_args(args, device):
    """The official derived settings: per-process batch, lr, SyncBN, beta2 and drop path of the model."""
    world = get_world_size()
    args.batch_size = per_process_batch(args.bs, world, args.accum_iter)  # per process and micro-step
    args.glb_batch_size = args.batch_size * world * args.accum_iter
    args.lr = args.base_lr * args.glb_batch_size / 256
    if not args.distributed or device.type != 'cuda':
        args.sbn = False
    if not args.ada:  # officially a model neither ResNet nor ConvNeXt kept 0: LAMB divided by |this gradient| alone
        args.ada = 0.999 if 'convnext' in args.model else 0.95
    if not args.dp:  # the official meaning of 0
        args.dp = spark_default_drop_path(args.model)


def resume(args, model, trainer, steps_per_epoch, checkpoints):
    """Resumes from --resume_from or the experiment folder (ours or an official spark_style file); returns the
    minimum and the last epoch's loss so far."""
    args.start_epoch = 0
    losses = {'min_loss': float('inf'), 'last_loss': float('inf')}
    path = resume_path(args.resume_from, args.auto_resume, args.exp_dir,
                       lambda folder: latest_spark_checkpoint(folder, args.model))
    if not path:
        return losses
    last_epoch, step, extra = resume_spark(path, model, trainer)
    args.start_epoch = checkpoints.resume_from({'epoch': last_epoch, 'extra': extra})
    trainer.num_updates = step if step is not None else args.start_epoch * steps_per_epoch
    print(f'resumed from {path} (epoch {last_epoch} done)')
    return {k: extra.get(k, v) for k, v in losses.items()}


def check_args(args):
    # --wp_ep may exceed --ep: the official schedule then warms up until the end
    check_flags(args, {'--mask': '(0, 1)', '--input_size': '>= 32', '--bs': '>= 1', '--accum_iter': '>= 1',
                       '--num_workers': '>= 0', '--dp': '[0, 1)', '--base_lr': '> 0', '--wd': '>= 0', '--wde': '>= 0',
                       '--ep': '>= 1', '--wp_ep': '>= 0', '--ada': '[0, 1)', '--save_every_steps': '>= 0',
                       '--vis_freq': '>= 0', '--print_freq': '>= 1'})
    if args.input_size % 32:
        raise ValueError(f'--input_size {args.input_size}: must be a multiple of 32 (the total stride of the '
                         'SparK CNNs, which is also the mask patch size)')
    # a multiple of --accum_iter; of the number of processes too, checked once they are known
    per_process_batch(args.bs, 1, args.accum_iter)


def main(args):
    check_args(args)
    args.exp_dir = args.output_dir = exp_dir_of(args)
    args.cmd = ' '.join(sys.argv)
    device = setup_run(args)
    resolve_args(args, device)
    # a bad --model or --input_size: ValueError
    model = build_spark(args.model, args.input_size, args.mask, args.sbn, args.dp, args.dec_width).to(device)
    model.set_grad_checkpointing(args.grad_ckpt)
    dataset = ImageFolderOrFlat(data_root(args.data_path), transform=spark_transform(args.input_size))
    loader = build_train_loader(dataset, args.batch_size, args.num_workers, args.pin_mem, args.seed, '--bs')
    if len(loader) < args.accum_iter:
        raise ValueError(f'{len(dataset)} images make {len(loader)} batches per process, fewer than --accum_iter '
                         f'{args.accum_iter}: lower --bs or --accum_iter')
    if args.init_weight:
        if not os.path.isfile(args.init_weight):
            raise FileNotFoundError(f'--init_weight {args.init_weight}: no such checkpoint file')
        state = read_checkpoint(args.init_weight)
        state = state.get('module', state.get('model', state))
        print(f'init_weight {args.init_weight}: {model.load_state_dict(state, strict=False)}')
    optimizer = build_optimizer(args, model)
    trainer = build_trainer(args, model, optimizer, device)

    def save(epoch, mid_epoch=None):  # after `epoch`, or inside it (a stop signal, --save_every_steps)
        save_spark_outputs(args, epoch - (mid_epoch is not None), trainer, model, optimizer,
                           {**losses, 'mid_epoch': mid_epoch})
    checkpoints = MidEpochCheckpoints(save, args.save_every_steps)
    losses = resume(args, model, trainer, len(loader) // args.accum_iter, checkpoints)
    attach_ddp(trainer, device, find_unused_parameters=False, forward_sync_buffers=False)
    schedule = SparkSchedule(args.lr, args.wd, args.wde, args.ep, args.wp_ep, len(loader) // args.accum_iter)
    log_writer = make_log_writer(args.log_dir or os.path.join(args.exp_dir, 'tensorboard_log'))
    log_txt = os.path.join(args.exp_dir, 'pretrain_log.txt')
    if args.start_epoch == 0 or not os.path.exists(log_txt):
        commit_id, commit_msg = git_info()
        log_line(log_txt, {'name': args.exp_name, 'cmd': args.cmd, 'git_commit_id': commit_id,
                           'git_commit_msg': commit_msg, 'model': args.model}, blank=True)
    vis_imgs, _ = fixed_vis_batch(ImageFolderOrFlat(dataset.root, vis_transform(args.input_size)))
    vis_mask = model.mask(len(vis_imgs), device, generator=torch.Generator().manual_seed(0))
    print(f'{args.model}: {len(dataset)} images from {dataset.root}; global batch {args.glb_batch_size}, '
          f'lr {args.lr:.3e}, drop path {args.dp}, {len(loader) // args.accum_iter} iterations per epoch')

    with tee_console(args.exp_dir):
        start = time.time()
        for epoch in range(args.start_epoch, args.ep):
            loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(loader, trainer, epoch, schedule, lambda m, samples, targets: m(samples),
                                    log_writer=log_writer, print_freq=args.print_freq, checkpoints=checkpoints)
            losses['last_loss'] = float(stats['loss'])
            losses['min_loss'] = min(losses['min_loss'], losses['last_loss'])
            save(epoch)
            write_bad_file_list(args.exp_dir, dataset)
            if is_main_process() and args.vis_freq and (epoch % args.vis_freq == 0 or epoch + 1 == args.ep):
                save_spark_pictures(model, vis_imgs.to(device), vis_mask, args.exp_dir, epoch, log_writer)
            log_epoch(args, epoch, start, losses, stats.get('skipped_files', 0), log_txt, log_writer)
        print(f'training time {fmt_time(time.time() - start)}; min loss {losses["min_loss"]:.4f}')


def log_epoch(args, epoch, start, losses, skipped_files, log_txt, log_writer):
    min_loss, last_loss = losses['min_loss'], losses['last_loss']
    remain = (time.time() - start) / (epoch + 1 - args.start_epoch) * (args.ep - epoch - 1)
    log_line(log_txt, {'cur_ep': f'{epoch + 1}/{args.ep}', 'last_L': last_loss, 'min_L': min_loss,
                       'skipped_files': skipped_files, 'rema': fmt_time(remain),
                       'fini': time.strftime('%m-%d %H:%M', time.localtime(time.time() + remain))})
    print(f'[*] [ep {epoch + 1}/{args.ep}] Min/Last Recon Loss: {min_loss:.4f}/{last_loss:.4f}, '
          f'Remain: {fmt_time(remain)}')
    if log_writer is not None:
        log_writer.add_scalar('pt_train/min_loss', min_loss, epoch)
        log_writer.add_scalar('pt_train/last_loss', last_loss, epoch)
        log_writer.add_scalar('pt_z_burnout/rest_hours', remain / 3600, epoch)
        log_writer.flush()


if __name__ == '__main__':
    run_cli(main, get_args_parser())
