"""What engine.py's loop communicates and when it waits for the device.

DDP: during gradient accumulation only the last micro-step of a window all-reduces (`no_sync` before it), the
all-reduced gradient is the mean of the ranks' local gradients, and after a FreezeOut freeze run_pretrain's
re-wrapped DDP neither buckets nor all-reduces the frozen parameters. Counted with a DDP comm hook on the
DistributedDataParallel that run_pretrain.main itself builds.

Host syncs: no `.item()`, `bool(tensor)`, `.tolist()`, `.cpu()` ... inside the step loop, only at print steps.
"""
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import engine
import run_pretrain
import util.runtime
from helpers import LinearRegression, engine_args, free_port, gloo_group, pretrain_args, write_images
from util.lr_sched import WarmupCosine
from util.metric_logger import MetricLogger
from util.train_step import TrainStep

PREFIX = 2048  # elements of each bucket kept for the cross-rank comparison


def _pretrain_worker(rank, world, port, data, out, record_path):
    wraps = []

    def hook(record, bucket):
        local = bucket.buffer()
        call = {'forwards': record['forwards'], 'numel': local.numel(),
                'params': sorted(record['names'][id(p)] for p in bucket.parameters()),
                'local': local[:PREFIX].clone(), 'local_norm': local.norm().item()}
        record['calls'].append(call)

        def reduced(fut):
            value = fut.value()
            call['reduced'] = value[:PREFIX].clone()
            return value
        return allreduce_hook(None, bucket).then(reduced)

    class CountingDDP(DistributedDataParallel):
        """The DistributedDataParallel of run_pretrain, with a comm hook that records every all-reduce."""

        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            record = {'names': {id(p): n for n, p in module.named_parameters()}, 'forwards': 0, 'calls': [],
                      'trainable': sorted(n for n, p in module.named_parameters() if p.requires_grad)}
            wraps.append(record)
            self.register_comm_hook(record, hook)
            self._record = record

        def forward(self, *args, **kwargs):
            self._record['forwards'] += 1
            return super().forward(*args, **kwargs)

    util.runtime.DistributedDataParallel = CountingDDP  # run_pretrain wraps through util.runtime.attach_ddp
    with gloo_group(rank, world, port, init=False):  # run_pretrain.main joins the group
        run_pretrain.main(pretrain_args(data, out, '--epochs', '3', '--warmup_epochs', '0', '--how_scale', 'linear',
                                        '--t_0', '0.3', '--accum_iter', '2', '--batch_size', '2', '--num_workers', '0',
                                        '--print_freq', '100'))
        for record in wraps:
            del record['names']
        torch.save(wraps, f'{record_path}.{rank}')


def test_run_pretrain_ddp_all_reduces_once_per_window_and_never_frozen_parameters(tmp_path):
    data = write_images(tmp_path / 'flat', 8)  # 2 ranks x batch 2: 2 micro-steps, one window per epoch
    record = str(tmp_path / 'comm')
    mp.spawn(_pretrain_worker, args=(2, free_port(), str(data), str(tmp_path / 'out'), record), nprocs=2, join=True)
    ranks = [torch.load(f'{record}.{rank}') for rank in range(2)]
    # freezes at epochs 1.0 (unit 0) and 2.0 (units 1..6), window starts: run_pretrain re-wraps DDP after each
    assert [[record['forwards'] for record in wraps] for wraps in ranks] == [[2, 2, 2]] * 2
    window_bytes = []
    for wraps in ranks:
        for record in wraps:
            calls = record['calls']
            windows = record['forwards'] // 2
            # no_sync: nothing is all-reduced on a window's first micro-step, every bucket on its last one
            assert all(call['forwards'] % 2 == 0 for call in calls), [call['forwards'] for call in calls]
            per_window = [[c for c in calls if c['forwards'] == 2 * (w + 1)] for w in range(windows)]
            assert len(calls) == sum(map(len, per_window)) and len({len(w) for w in per_window}) == 1
            for window in per_window:  # the buckets hold exactly the trainable parameters, each once
                names = [n for c in window for n in c['params']]
                assert sorted(names) == record['trainable']
            window_bytes.append(sum(c['numel'] for c in per_window[0]) * 4)
    assert window_bytes[:3] == window_bytes[3:]
    assert all(a > b > 0 for a, b in zip(window_bytes[:2], window_bytes[1:3]))  # frozen units are not all-reduced
    frozen = set(ranks[0][0]['trainable']) - set(ranks[0][-1]['trainable'])
    assert any(n.startswith('blocks.5.') for n in frozen) and 'patch_embed.proj.weight' in frozen
    # the all-reduced bucket is the mean of the ranks' local (accumulated) gradients, the same on both ranks
    for w0, w1 in zip(*ranks):
        for c0, c1 in zip(w0['calls'], w1['calls']):
            assert c0['params'] == c1['params']
            assert not torch.equal(c0['local'], c1['local'])  # the ranks saw different samples
            torch.testing.assert_close(c0['reduced'], (c0['local'] + c1['local']) / 2, rtol=1e-6, atol=1e-9)
            assert torch.equal(c0['reduced'], c1['reduced'])


SYNC_METHODS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')


class SyncLog:
    """Patches the tensor methods that make the host wait for the device, recording the phase of each call."""

    def __init__(self, monkeypatch):
        self.phase, self.calls = ('setup', -1), []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append((self.phase, _name))
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        original_update = MetricLogger.update

        def update(meter, **values):  # the last thing of a step body; the print (if any) follows
            original_update(meter, **values)
            self.phase = ('after_step', self.phase[1])
        monkeypatch.setattr(MetricLogger, 'update', update)


class PhasedLoader:
    """Marks where each step's body starts (the batch is handed over) and where fetching the next one starts."""

    def __init__(self, loader, log):
        self.loader, self.log = loader, log

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for step in range(len(self.loader)):
            self.log.phase = ('data', step)
            batch = next(batches)
            self.log.phase = ('step', step)
            yield batch


def test_no_host_sync_inside_the_step_loop(monkeypatch, capsys):
    torch.manual_seed(0)
    model = LinearRegression()
    data = TensorDataset(torch.randn(32, 6), torch.zeros(32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    trainer = TrainStep(model, opt, 'cpu', accum_iter=2, clip_grad=1.0)
    args = engine_args(batch_size=4, accum_iter=2, warmup_epochs=1, epochs=2, print_freq=4)
    w = model.fc.weight.detach().clone()
    log = SyncLog(monkeypatch)
    loader = PhasedLoader(DataLoader(data, batch_size=4), log)
    schedule = WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs)
    engine.train_one_epoch(loader, trainer, 0, schedule, engine.masked_modeling_loss(args.mask_ratio),
                                    print_freq=args.print_freq)
    calls = list(log.calls)
    monkeypatch.undo()
    assert trainer.num_updates == 4 and not torch.equal(w, model.fc.weight)  # it trained
    print_steps = {3, 7}  # every 4 steps and the last one
    assert [c for c in calls if c[0][0] == 'step'] == []
    assert [c for c in calls if c[0][0] == 'after_step' and c[0][1] not in print_steps] == []
    assert {c[0][1] for c in calls if c[0][0] == 'after_step'} == print_steps  # the counting works
    assert 'Epoch: [0]' in capsys.readouterr().out
