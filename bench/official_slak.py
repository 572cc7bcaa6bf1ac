"""main_slak.py's training parts beside the official SLaK code (sparse_core.Masking, engine.train_one_epoch,
model_sema.ModelEma, optim_factory, utils.cosine_scheduler, models/SLaK.py): a whole short run, float64, CPU.

On demand (needs the official source, which this repository does not ship):

    git clone https://github.com/VITA-Group/SLaK /tmp/slak
    python bench/official_slak.py --official /tmp/slak --sparse_init snip

Both sides start from the same weights, see the same batches in the same order (an odd number of batches per
epoch under --update_freq 2, so the last batch of each epoch is skipped) and draw the same random regrowth. The
script compares the masks after every prune-and-regrow event, and at the end the weights, BatchNorm statistics
and EMA weights. Official pieces this CPU cannot run are replaced: the CUDA depthwise kernel by the same
depthwise convolution in PyTorch (ours), SyncBatchNorm by BatchNorm (one process), `torch.cuda.synchronize` by
nothing, `.cuda()` by staying on the CPU; `torch._six` and tensorboardX (gone from current releases) by what the code reads from them.
"""
import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import main_slak  # noqa: E402
from engine import train_one_epoch  # noqa: E402
from util.train_step import TrainStep  # noqa: E402

FLAGS = ('--model SLaK_tiny --width_factor 0.25 --kernel_size 7 7 7 3 3 --Decom True --input_size 32 --batch_size 8 '
         '--update_freq 2 --nb_classes 10 --epochs 2 --warmup_epochs 1 --mixup 0 --cutmix 0 --drop_path 0 '
         '--sparse --sparsity 0.4 -u 2 --prune_rate 0.3 --model_ema true --model_ema_decay 0.9 '
         '--lr 4e-3 --device cpu --amp none')
ROWS = 56  # 7 batches of 8 per epoch: 3 windows of 2 and a last batch the official engine skips


def parse():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--official', default='/tmp/slak', help='a checkout of github.com/VITA-Group/SLaK')
    p.add_argument('--sparse_init', default='snip', choices=['snip', 'ERK'])
    return p.parse_args()


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_modules(root):
    """The official files as modules; `engine` and `utils` under other names beside ours."""
    class DepthwiseConv(nn.Conv2d):  # what depthwise_conv2d_implicit_gemm computes, on the CPU
        def __init__(self, channels, kernel_size, bias=False):
            kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
            super().__init__(channels, channels, kernel_size, padding=(kernel_size[0] // 2, kernel_size[1] // 2),
                             groups=channels, bias=bias)
    sys.modules['depthwise_conv2d_implicit_gemm'] = types.SimpleNamespace(DepthWiseConv2dImplicitGEMM=DepthwiseConv)
    sys.modules['torch._six'] = types.SimpleNamespace(inf=math.inf)
    sys.modules['tensorboardX'] = types.SimpleNamespace(SummaryWriter=None)
    sys.path.insert(0, str(root))  # sparse_core imports funcs
    for line in (root / 'optim_factory.py').read_text().splitlines():  # optimizers timm renamed since (unused here)
        if line.startswith('from timm.optim.'):
            module, name = line.split()[1], line.split()[3]
            module = importlib.import_module(module)
            if not hasattr(module, name):
                setattr(module, name, None)
    official = types.SimpleNamespace(
        utils=load('slak_utils', root / 'utils.py'), sparse_core=load('sparse_core', root / 'sparse_core.py'),
        model_sema=load('model_sema', root / 'model_sema.py'), optim_factory=load('optim_factory', root / 'optim_factory.py'))
    sys.modules['utils'] = official.utils  # engine.py: import utils
    official.engine = load('slak_engine', root / 'engine.py')
    official.slak = load('slak_models', root / 'models' / 'SLaK.py')
    official.slak.use_sync_bn = False
    return official


class OneEpochSampler(torch.utils.data.Sampler):  # in order; main_slak calls set_epoch
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        pass


def record_events(masking, names, events):
    """Appends the masks after every prune-and-regrow event of `masking` (ours or official)."""
    truncate = masking.truncate_weights

    def recorded(*a, **k):
        out = truncate(*a, **k)
        events.append({n: masking.masks[n].detach().clone().bool() for n in names})
        return out
    masking.truncate_weights = recorded


def main():
    cli = parse()
    args = main_slak.get_args_parser().parse_args(FLAGS.split() + ['--sparse_init', cli.sparse_init])
    images = torch.randn(ROWS, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(ROWS) % 10
    data = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=OneEpochSampler(ROWS), drop_last=True)
    steps = ROWS // (8 * args.update_freq)
    torch.manual_seed(0)
    ours = main_slak.build_model(args).double()  # before the official file registers its own SLaK_tiny with timm
    official = official_modules(Path(cli.official))
    theirs = official.slak.SLaK(num_classes=10, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], drop_path_rate=0.0,
                                kernel_size=args.kernel_size, width_factor=args.width_factor, Decom=True,
                                bn=True).double()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    their_events, our_events = [], []

    # ---- official: main.py's order (optimizer, schedules, Masking + add_module, ModelEma, the epochs)
    torch.manual_seed(1)
    args.distributed, args.opt_eps = False, 1e-8
    optimizer = official.optim_factory.create_optimizer(args, theirs, skip_list=None)
    lrs = official.utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps, warmup_epochs=args.warmup_epochs)
    wds = official.utils.cosine_scheduler(args.weight_decay, args.weight_decay, args.epochs, steps)
    decay = official.sparse_core.CosineDecay(args.prune_rate, steps * args.epochs)
    mask = official.sparse_core.Masking(optimizer, train_loader=loader, prune_mode=args.prune,
                                        prune_rate_decay=decay, growth_mode=args.growth,
                                        redistribution_mode=args.redistribution, args=args)
    mask.add_module(theirs)
    names = list(mask.masks)
    their_init = {n: mask.masks[n].bool().clone() for n in names}
    record_events(mask, names, their_events)
    ema = official.model_sema.ModelEma(theirs, decay=args.model_ema_decay, device='', resume='')
    criterion = main_slak.build_criterion(args, None)
    torch.cuda.synchronize = lambda *a: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # funcs.py moves its random draws to the GPU
    for epoch in range(args.epochs):
        official.engine.train_one_epoch(theirs, criterion, loader, optimizer, torch.device('cpu'), epoch, None, None,
                                        ema, None, start_steps=epoch * steps, lr_schedule_values=lrs,
                                        wd_schedule_values=wds, num_training_steps_per_epoch=steps,
                                        update_freq=args.update_freq, use_amp=False, mask=mask)

    # ---- ours: main_slak.main's order
    torch.manual_seed(1)
    trainer = TrainStep(ours, main_slak.build_optimizer(args, ours), 'cpu', 'none', args.update_freq, args.clip_grad)
    masking = main_slak.build_masking(args, trainer, loader, steps, None)
    our_init = {n: masking.masks[n].bool().clone() for n in names}
    record_events(masking, names, our_events)
    our_ema = main_slak.build_ema(args, ours, masking, None)
    compute_loss = main_slak.classification_loss(criterion, torch.device('cpu'), None)
    schedule = main_slak.build_schedule(args, len(loader))
    for epoch in range(args.epochs):
        train_one_epoch(loader, trainer, epoch, schedule, compute_loss, [masking, our_ema], print_freq=10 ** 6,
                        partial_window='skip')

    print(f'{ROWS} images, batch 8, --update_freq 2 ({len(loader)} batches, {steps} steps per epoch), '
          f'{args.epochs} epochs, --sparse_init {cli.sparse_init}, prune and regrow every {args.update_frequency} '
          f'steps: {len(their_events)} official events, {len(our_events)} ours')
    same = [all(torch.equal(a[n], b[n]) for n in names) for a, b in zip([their_init] + their_events,
                                                                         [our_init] + our_events)]
    print('masks equal at init and after each event:', same)
    def difference(a, b):  # over the tensors of two state dicts, relative to max(scale, 1)
        return max(float((a[k].double() - b[k].double()).abs().max() / max(float(a[k].double().abs().max()), 1.0))
                   for k in a if a[k].is_floating_point())
    differences = {'weights and BN statistics': difference(theirs.state_dict(), ours.state_dict()),
                   'EMA': difference(ema.ema.state_dict(), our_ema.module.state_dict())}
    print('largest difference at the end (relative to max(scale, 1)): ' +
          ', '.join(f'{k} {v:.1e}' for k, v in differences.items()))


if __name__ == '__main__':
    main()
