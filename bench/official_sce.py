"""main_sce.py's training parts beside eztorch's SCEModel under a Lightning Trainer: a whole short run, float64, CPU.

On demand (needs eztorch's source and Lightning, which this repository does not install):

    git clone https://github.com/juliendenize/eztorch /tmp/eztorch
    pip install --target /tmp/ezpkgs --no-deps lightning lightning-utilities torchmetrics hydra-core omegaconf \
        antlr4-python3-runtime==4.9.3 einops tabulate pytorchvideo==0.1.5 iopath fvcore portalocker yacs termcolor
    PYTHONPATH=/tmp/ezpkgs:/tmp/eztorch python bench/official_sce.py --accum_iter 2 --teacher_update micro_batch

Both runs start from the same weights and queue (eztorch's, loaded into ours), see the same batches in the same
order (48 two-view clips, loader batch 4) and use the same recipe: LARS (momentum 0.9, trust 1e-3, weight decay
1e-6), lr 2.4 x global batch / 256 with one warmup epoch then cosine, coeff and temp_m warmups over the first
epoch, cosine target momentum from 0.99, a 32-key queue, 2 epochs. eztorch's optimizer gets
num_steps_per_epoch = rows / global batch, so both lr schedules count optimizer steps. Before every micro-batch,
and at the end, the script compares the whole state (student, target, BatchNorm statistics, queue, pointer), the
lr, and each micro-batch's loss, and prints the largest difference of each, relative to max(scale, 1).

eztorch's package __init__ files import data libraries the SCE model never uses (torchaug, SoccerNet, OpenCV,
...): they are replaced by empty modules here, and timm too (eztorch pins timm 0.6).
"""
import argparse
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / 'tests')]
UNUSED = ('timm', 'torchaug', 'SoccerNet', 'cv2', 'seaborn', 'sklearn', 'decord', 'av')


class _EmptyModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        value = type(attr, (), {'__init__': lambda self, *a, **k: None})
        setattr(self, attr, value)
        return value


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in UNUSED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _EmptyModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def parse():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rows', default=48, type=int, help='clips per epoch (not a multiple of the global batch: '
                   'the last window of each epoch is partial)')
    p.add_argument('--accum_iter', default=2, type=int)
    p.add_argument('--teacher_update', default='micro_batch', choices=['step', 'micro_batch'])
    p.add_argument('--queue_size', default=32, type=int)
    return p.parse_args()


ARGS = parse()
MICRO, EPOCHS, WARMUP, LR = 4, 2, 1, 2.4
GLOBAL = MICRO * ARGS.accum_iter
STEPS = ARGS.rows // GLOBAL
SCE = dict(sym=True, use_keys=False, temp=0.1, temp_m=0.05, coeff=0.5, initial_momentum=0.99,
           scheduler_momentum='cosine', warmup_epoch_coeff=WARMUP, start_warmup_coeff=1.0, warmup_scheduler_coeff='linear',
           warmup_epoch_temp_m=WARMUP, start_warmup_temp_m=0.07, warmup_scheduler_temp_m='cosine',
           normalize_outputs=True, mutual_pass=False, num_global_crops=2)


def eztorch_run(clips):
    """eztorch's SCEModel, fitted by Lightning; returns its initial state, the state before every micro-batch
    and at the end, and every micro-batch's loss."""
    sys.meta_path.insert(0, _EmptyModules())
    import lightning.pytorch as pl
    import torch
    from omegaconf import OmegaConf
    from eztorch.models.siamese.sce import SCEModel

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(clips)

        def __getitem__(self, i):
            return {'input': [clips[i, 0], clips[i, 1]], 'idx': i}

    class Data(pl.LightningDataModule):
        train_num_samples, train_global_batch_size, train_local_batch_size = len(clips), MICRO, MICRO

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Clips(), batch_size=MICRO, shuffle=False, drop_last=True)

    class Record(pl.Callback):
        states, losses = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.states.append(snapshot(module.state_dict(), trainer.optimizers[0].param_groups[0]['lr']))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs['loss']) * ARGS.accum_iter)  # Lightning reports loss / A

        def on_train_end(self, trainer, module):
            self.states.append(snapshot(module.state_dict(), trainer.optimizers[0].param_groups[0]['lr']))

    head = {'_target_': 'eztorch.models.heads.MLPHead', 'input_dim': 8, 'hidden_dims': [16], 'output_dim': 8,
            'num_layers': 2, 'norm_layer': 'bn_1D', 'last_norm': True, 'last_affine': False, 'bias': False,
            'last_bias': False}
    optimizer = {'_target_': 'eztorch.optimizers.optimizer_factory', '_recursive_': False, 'name': 'lars',
                 'initial_lr': LR, 'batch_size': GLOBAL, 'num_steps_per_epoch': STEPS, 'scaler': 'linear',
                 'params': {'momentum': 0.9, 'trust_coefficient': 0.001, 'weight_decay': 1e-6},
                 'scheduler': {'_target_': 'eztorch.schedulers.scheduler_factory', '_recursive_': False,
                               'name': 'linear_warmup_cosine_annealing_lr', 'interval': 'step',
                               'params': {'max_epochs': EPOCHS, 'warmup_epochs': WARMUP, 'warmup_start_lr': 0.0,
                                          'eta_min': 0.0}}}
    cfg = OmegaConf.create({'trunk': {'_target_': 'test_sce_model.TinyTrunk'}, 'optimizer': optimizer,
                            'projector': head, 'predictor': {**head, 'last_norm': False},
                            'queue': {'size': ARGS.queue_size, 'feature_dim': 8}})
    torch.manual_seed(0)
    model = SCEModel(trunk=cfg.trunk, optimizer=cfg.optimizer, projector=cfg.projector, predictor=cfg.predictor,
                     queue=cfg.queue, shuffle_bn=False, num_devices=1, **SCE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ARGS.accum_iter, accelerator='cpu', devices=1,
                         precision='64-true', logger=False, enable_checkpointing=False, callbacks=[Record()],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Data())
    return initial, Record.states, Record.losses


def our_run(clips, initial):
    """main_sce.py's parts (build_sce, build_lars, sce_schedule, TrainStep, SCEHook, the engine) on the same
    batches, from eztorch's initial state."""
    import torch
    from engine import train_one_epoch
    from main_sce import build_sce
    from test_sce_model import TinyTrunk
    from util.sce.hooks import SCEHook
    from util.sce.optim import build_lars, scale_learning_rate, sce_schedule
    from util.train_step import TrainStep

    # --teacher_update micro_batch: the schedules' horizons in loader batches per epoch, as main_sce.py passes them
    horizon = ARGS.rows // MICRO if ARGS.teacher_update == 'micro_batch' else STEPS
    sce = build_sce(None, horizon, EPOCHS, trunk=TinyTrunk(), queue_size=ARGS.queue_size, queue_feature_dim=8,
                    projector_hidden_dims=(16,), projector_output_dim=8, predictor_hidden_dims=(16,),
                    predictor_output_dim=8, projector_last_norm=True, **SCE).double()
    sce.load_state_dict(initial)
    lr = scale_learning_rate(LR, GLOBAL, 'linear')
    trainer = TrainStep(sce, build_lars(sce, lr, 1e-6, 0.9, 0.001), 'cpu', accum_iter=ARGS.accum_iter)
    batches = [(clips[i:i + MICRO], torch.zeros(MICRO)) for i in range(0, len(clips) - MICRO + 1, MICRO)]
    schedule = sce_schedule(lr, 1e-6, EPOCHS, WARMUP, STEPS, len(batches), ARGS.accum_iter,
                            steps_done=lambda: trainer.num_updates)
    states, losses = [], []

    def loss(model, samples, labels):
        states.append(snapshot(model.state_dict(), trainer.optimizer.param_groups[0]['lr']))
        out = model([samples[:, 0], samples[:, 1]])
        losses.append(float(out[0]))
        return out
    for epoch in range(EPOCHS):
        sce.epoch = epoch
        train_one_epoch(batches, trainer, epoch, schedule, loss, [SCEHook(sce, ARGS.teacher_update)],
                        print_freq=10 ** 6, partial_window='step')
    states.append(snapshot(sce.state_dict(), trainer.optimizer.param_groups[0]['lr']))
    return states, losses


def snapshot(state, lr):
    return {'lr': lr, **{k: v.detach().clone() for k, v in state.items()}}


def difference(a, b):
    return float((a.double() - b.double()).abs().max() / max(float(b.double().abs().max()), 1.0))


def main():
    import torch
    clips = torch.randn(ARGS.rows, 2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    initial, official, official_losses = eztorch_run(clips)
    ours, our_losses = our_run(clips, initial)
    assert len(official) == len(ours), (len(official), len(ours))
    worst, per_micro_batch = {}, []
    for j, (a, b) in enumerate(zip(official, ours)):
        d_step = 0.0
        for key in a:
            if key == 'lr' and j == len(official) - 1:
                continue  # after the run: Lightning has stepped its scheduler once more
            d = abs(a[key] - b[key]) if key == 'lr' else difference(b[key], a[key])
            group = 'lr' if key == 'lr' else key.split('.')[0] + (' BN statistics' if 'running' in key else '')
            worst[group] = max(worst.get(group, 0.0), d)
            d_step = max(d_step, d)
        per_micro_batch.append(d_step)
    worst['loss'] = max(abs(x - y) / abs(x) for x, y in zip(official_losses, our_losses))
    print(f'{ARGS.rows} clips, loader batch {MICRO}, accumulation {ARGS.accum_iter}, --teacher_update '
          f'{ARGS.teacher_update}: {len(ours) - 1} micro-batches, {EPOCHS} epochs')
    print('largest difference: ' + ', '.join(f'{k} {v:.1e}' for k, v in sorted(worst.items())))
    print('per micro-batch (largest over the state): ' + ' '.join(f'{d:.0e}' for d in per_micro_batch))


if __name__ == '__main__':
    main()
