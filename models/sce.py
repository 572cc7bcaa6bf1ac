"""SCE, Similarity Contrastive Estimation (Denize et al.), as eztorch's `SCEModel` for R3D-18 video pretraining
(https://github.com/juliendenize/eztorch, eztorch/models/siamese/sce.py).

Online branch: trunk (R3D-18 + global pool) -> projector -> predictor -> q. Target branch: EMA copies of trunk
and projector, run under no_grad in train mode, k = normalize(projector'(trunk'(clip))). With a queue U [D, K]
of past target outputs, one direction of the loss is

  online logits  l_i = [q_i.k_i, q_i.U] / temp,       target logits  t_i = [0, k_i.U] / temp_m
  w_i = L1-normalise(coeff * onehot(0) + (1 - coeff) * softmax(t_i)),   L = mean_i -sum_j w_ij log_softmax(l_i)_j

The positive's target logit is the constant 0, not -inf (the official unit test asserts it). `SCEHook.after_step`
enqueues the step's keys and updates the EMA after the optimizer step, so every loss term of a step sees the
queue as it was at the step's start without the official clone of the queue.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.r3d import r3d18_trunk

LARGE_NUM = 1e9


# ----------------------------------------------------------------------------------------------- the loss

def _sce_terms(q, k, queue, coeff, temp, temp_m, k_global=None, use_keys=False, rank=None):
    """(loss, mean weight on the positive) of one direction; see `sce_loss`."""
    batch = q.shape[0]
    if use_keys:
        k_global = k if k_global is None else k_global
        rank = (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0) if rank is None else rank
        sim_q, sim_k = [q @ k_global.T], [k @ k_global.T]
        labels = torch.arange(batch, device=q.device) + batch * rank
    else:
        sim_q, sim_k = [(q * k).sum(1, keepdim=True)], [torch.zeros_like(q[:, :1])]
        labels = torch.zeros(batch, dtype=torch.long, device=q.device)
    if queue is not None:
        sim_q.append(q @ queue)
        sim_k.append(k @ queue)
    logits_q, logits_k = torch.cat(sim_q, 1), torch.cat(sim_k, 1)
    mask = F.one_hot(labels, logits_q.shape[1]).to(logits_q.dtype)  # an integer mask makes coeff * mask float32
    if use_keys:
        logits_k = logits_k - LARGE_NUM * mask
    logits_q, logits_k = logits_q / temp, logits_k / temp_m
    weights = F.normalize(coeff * mask + (1 - coeff) * F.softmax(logits_k, dim=1), p=1, dim=1)
    loss = -(weights * F.log_softmax(logits_q, dim=1)).sum(1).mean()
    return loss, weights.gather(1, labels[:, None]).mean()


def sce_loss(q, k, queue, coeff, temp, temp_m, k_global=None, use_keys=False, rank=None):
    """One direction of the SCE loss, a 0-d tensor (mean over the local batch).

    q: [B, D] online predictions (gradients flow here); k: [B, D] target outputs of the other view (treated as
    constants); queue: [D, K] or None; k_global: [B * world, D] keys of all ranks in rank order (use_keys only;
    default k); rank: this process's rank (default: from torch.distributed)."""
    return _sce_terms(q, k.detach(), queue, coeff, temp, temp_m,
                      None if k_global is None else k_global.detach(), use_keys, rank)[0]


def scheduler_value(kind, start, end, step, max_step):
    """`kind` in {None, 'linear', 'cosine'} from start (step 0) to end (step max_step), held there after, with
    eztorch's arithmetic (utils.scheduler_value), so the values agree to the last bit. The official 'linear' runs
    backwards when end > start; this one does not."""
    if kind is None:
        return start
    max_step = max(max_step, 1)
    step = min(max(step, 0), max_step)
    if kind == 'linear':
        return start + step * (end - start) / max_step
    if kind == 'cosine':
        rise = 0.5 * (1.0 + math.cos(math.pi + math.pi * step / max_step))
        return start + rise * (end - start) if end > start else start - rise * (start - end)
    raise ValueError(f'unknown scheduler {kind!r} (linear, cosine or none)')


def momentum_value(step, total_steps, initial, kind='cosine', steps_per_epoch=1):
    """EMA momentum after optimizer step `step` (0-based): cosine from `initial` at step 0 to 1.0 at
    total_steps - 1; 'cosine_epoch' the same per epoch; 'constant' always `initial`."""
    if kind == 'constant':
        return initial
    if kind == 'cosine':
        s, last = step, total_steps - 1
    elif kind == 'cosine_epoch':
        s, last = step // steps_per_epoch, total_steps // steps_per_epoch - 1
    else:
        raise ValueError(f'--scheduler_momentum must be constant, cosine or cosine_epoch, got {kind!r}')
    return 1 - (1 - initial) * (math.cos(math.pi * min(s / max(last, 1), 1.0)) + 1) / 2


@torch.no_grad()
def concat_all_gather(x):
    """all_gather + concatenation in rank order, without gradient; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def at_least_fp32(x):
    """fp16 / bf16 (autocast outputs) to fp32 for the loss; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------- modules

class MLPHead(nn.Module):
    """eztorch's MLPHead: hidden layers Linear(no bias) -> BN1d(affine) -> ReLU, then a last
    Linear(no bias) -> BN1d(affine=last_affine) only if last_norm. Default PyTorch init. Keys `layers.N.*`."""

    def __init__(self, input_dim, hidden_dims, output_dim, last_norm=False, last_affine=False):
        super().__init__()
        layers, dims = [], [input_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], output_dim, bias=False))
        if last_norm:
            layers.append(nn.BatchNorm1d(output_dim, affine=last_affine))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class OnlineLinearEvaluator(nn.Module):
    """Monitoring only: Linear(num_features -> num_classes) on detached features, its own Adam (lr 1e-4,
    no weight decay), stepped by `step(h, labels)` in fp32. Under DDP its gradients are averaged by hand (SCE
    tells DDP to ignore it) and its weights are broadcast from rank 0 at the first step."""

    def __init__(self, num_features, num_classes, lr=1e-4):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr, weight_decay=0.0)
        self._synced = False

    def forward(self, h):
        return self.linear(h)

    def step(self, h, labels):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not self._synced:
            for p in self.linear.parameters():
                dist.broadcast(p.data, 0)
        self._synced = True
        with torch.enable_grad(), torch.autocast(h.device.type, enabled=False):
            logits = self.linear(at_least_fp32(h.detach()))
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if distributed:
            for p in self.linear.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())
        self.optimizer.step()
        acc1 = (logits.detach().argmax(1) == labels).float().mean()
        return {'online_loss': loss.detach(), 'online_acc1': acc1}


class OnlineEvalClassifier(nn.Module):
    """The online evaluator as a classifier of raw clips, for validation (engine_finetune.evaluate): clips
    [B, 3, T, H, W] in 0..255 -> /255 and normalised (mean 0.45, std 0.225: the reference run's validation
    transform) -> trunk -> the evaluator's linear head, run in fp32 as in its training step. It shares the
    SCE's modules; `eval()` puts the trunk in eval mode (BN running statistics)."""

    def __init__(self, sce, mean=0.45, std=0.225):
        super().__init__()
        sce = sce.module if isinstance(sce, nn.parallel.DistributedDataParallel) else sce  # DDP-wrapped or not
        if sce.online_evaluator is None:
            raise ValueError('this SCE model has no online evaluator (built with num_classes 0)')
        self.trunk, self.head = sce.trunk, sce.online_evaluator.linear
        self.mean, self.std = mean, std

    def forward(self, clips):
        dtype = next(self.head.parameters()).dtype  # float32, or float64 for a float64 model
        h = self.trunk((clips.to(dtype) / 255 - self.mean) / self.std)
        with torch.autocast(h.device.type, enabled=False):
            return self.head(at_least_fp32(h))


class SCE(nn.Module):
    """SCE pretraining model. `forward(views, labels=None) -> (loss, logs)`; views: list of [B, C, T, H, W] clips,
    the `num_global_crops` global ones first. Call `SCEHook(sce).after_step` after every optimizer step.

    `steps_per_epoch` (floor(rows / global batch), as eztorch) and `epochs` define the momentum and the
    coeff / temp_m schedules; `global_step` (optimizer steps done) is kept by the hook; set it on resume.
    (eztorch under accumulate_grad_batches counts micro-batches in its horizons: main_sce --teacher_update
    micro_batch passes those.)
    State dict: trunk, projector, predictor, momentum_trunk, momentum_projector, queue, queue_ptr (the official
    keys) and online_evaluator.* when num_classes > 0."""

    def __init__(self, trunk=None, steps_per_epoch=1, epochs=1, coeff=0.5, temp=0.1, temp_m=0.05,
                 start_warmup_temp_m=0.05, warmup_epoch_temp_m=0, warmup_scheduler_temp_m='cosine',
                 warmup_epoch_coeff=0, start_warmup_coeff=1.0, warmup_scheduler_coeff='linear',
                 scheduler_coeff=None, final_scheduler_coeff=0.0, queue_size=32768, queue_feature_dim=256,
                 initial_momentum=0.99, scheduler_momentum='cosine', sym=True, use_keys=False,
                 normalize_outputs=True, mutual_pass=False, num_global_crops=2, num_local_crops=0,
                 projector_hidden_dims=(1024, 1024), projector_output_dim=256, projector_last_norm=True,
                 projector_last_affine=False, predictor_hidden_dims=(1024,), predictor_output_dim=256,
                 predictor_last_norm=False, predictor_last_affine=False, num_classes=0, online_eval_lr=1e-4):
        super().__init__()
        if queue_size and queue_feature_dim != projector_output_dim:
            raise ValueError(f'--queue_feature_dim ({queue_feature_dim}) must equal --projector_output_dim '
                             f'({projector_output_dim})')
        if not queue_size and not use_keys:
            raise ValueError('--queue_size 0 needs --use_keys: without queue and keys the loss is identically 0')
        if num_global_crops < 1 or num_local_crops < 0 or num_global_crops + num_local_crops < 2:
            raise ValueError('SCE needs at least two crops: --num_global_crops >= 1, --num_local_crops >= 0')
        self.trunk = trunk if trunk is not None else r3d18_trunk()
        self.projector = MLPHead(self.trunk.num_features, projector_hidden_dims, projector_output_dim,
                                 projector_last_norm, projector_last_affine)
        self.predictor = MLPHead(projector_output_dim, predictor_hidden_dims, predictor_output_dim,
                                 predictor_last_norm, predictor_last_affine)
        self.momentum_trunk = copy.deepcopy(self.trunk)  # same weights and BN buffers at step 0
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_trunk.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False
        if queue_size:
            self.register_buffer('queue', F.normalize(torch.randn(queue_feature_dim, queue_size), dim=0))
            self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))
        else:
            self.queue = None
        self.online_evaluator = OnlineLinearEvaluator(self.trunk.num_features, num_classes, online_eval_lr) \
            if num_classes else None
        if self.online_evaluator is not None:  # its own optimizer; DDP must not wait for its gradients
            self._ddp_params_and_buffers_to_ignore = [f'online_evaluator.{n}'
                                                      for n, _ in self.online_evaluator.named_parameters()]
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps = steps_per_epoch * epochs
        self.coeff, self.temp, self.temp_m = coeff, temp, temp_m
        self.start_warmup_temp_m, self.warmup_epoch_temp_m = start_warmup_temp_m, warmup_epoch_temp_m
        self.warmup_scheduler_temp_m = warmup_scheduler_temp_m
        self.warmup_epoch_coeff, self.start_warmup_coeff = warmup_epoch_coeff, start_warmup_coeff
        self.warmup_scheduler_coeff = warmup_scheduler_coeff
        self.scheduler_coeff, self.final_scheduler_coeff = scheduler_coeff, final_scheduler_coeff
        self.initial_momentum, self.scheduler_momentum = initial_momentum, scheduler_momentum
        self.sym, self.use_keys, self.normalize_outputs = sym, use_keys, normalize_outputs
        self.mutual_pass = mutual_pass
        self.num_global_crops, self.num_crops = num_global_crops, num_global_crops + num_local_crops
        self.global_step = 0
        self.epoch = None  # the training loop's epoch (main_sce sets it); None: global_step // steps_per_epoch
        self._pending_keys = []
        momentum_value(0, self.total_steps, initial_momentum, scheduler_momentum, steps_per_epoch)  # validates

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint the online trunk (the momentum trunk runs under no_grad and stores nothing)."""
        self.trunk.set_grad_checkpointing(enable)

    # ----- schedules (host-side floats of global_step; the warmups end with their epoch, as eztorch's)
    def current_epoch(self):
        return self.global_step // self.steps_per_epoch if self.epoch is None else self.epoch

    def current_temp_m(self):
        spe, s = self.steps_per_epoch, self.global_step
        if self.warmup_epoch_temp_m > 0 and self.current_epoch() < self.warmup_epoch_temp_m:
            return scheduler_value(self.warmup_scheduler_temp_m, self.start_warmup_temp_m, self.temp_m, s,
                                   self.warmup_epoch_temp_m * spe - 1)
        return self.temp_m

    def current_coeff(self):
        spe, s, warm = self.steps_per_epoch, self.global_step, self.warmup_epoch_coeff
        if warm > 0 and self.current_epoch() < warm:
            return scheduler_value(self.warmup_scheduler_coeff, self.start_warmup_coeff, self.coeff, s,
                                   warm * spe - 1)
        if self.scheduler_coeff is not None:
            return scheduler_value(self.scheduler_coeff, self.coeff, self.final_scheduler_coeff, s - warm * spe,
                                   (self.epochs - warm) * spe - 1)
        return self.coeff

    def current_momentum(self, step=None):
        return momentum_value(self.global_step if step is None else step, self.total_steps,
                              self.initial_momentum, self.scheduler_momentum, self.steps_per_epoch)

    # ----- branches
    def _normalize(self, x):
        return F.normalize(x, dim=1) if self.normalize_outputs else x

    def _online(self, views):
        """[(h, z, q)] per view: one forward per view, or with mutual_pass one trunk pass per run of
        same-shaped consecutive views and one head pass over everything (shared BN statistics)."""
        if not self.mutual_pass:
            hs = [self.trunk(x) for x in views]
        else:
            hs, start = [], 0
            while start < len(views):
                end = start + 1
                while end < len(views) and views[end].shape == views[start].shape:
                    end += 1
                hs.extend(self.trunk(torch.cat(views[start:end])).split([len(x) for x in views[start:end]]))
                start = end
            h_all = torch.cat(hs)
            z_all = self.projector(h_all)
            q_all = self.predictor(z_all)
            sizes = [len(h) for h in hs]
            return [(h, self._normalize(z), self._normalize(q))
                    for h, z, q in zip(hs, z_all.split(sizes), q_all.split(sizes))]
        outs = []
        for h in hs:
            z = self.projector(h)
            outs.append((h, self._normalize(z), self._normalize(self.predictor(z))))
        return outs

    @torch.no_grad()
    def _target(self, views):
        if self.mutual_pass:
            z = self.momentum_projector(self.momentum_trunk(torch.cat(views)))
            return list(self._normalize(z).split([len(x) for x in views]))
        return [self._normalize(self.momentum_projector(self.momentum_trunk(x))) for x in views]

    # ----- one step
    def forward(self, views, labels=None):
        views = [views] if torch.is_tensor(views) else list(views)
        if len(views) != self.num_crops:
            raise ValueError(f'SCE expects {self.num_crops} views (--num_global_crops + --num_local_crops), '
                             f'got {len(views)}')
        coeff, temp_m = self.current_coeff(), self.current_temp_m()
        queue = self.queue  # not modified before the optimizer step (SCEHook), so no snapshot copy is needed
        if self.sym:
            targets = self._target(views[:self.num_global_crops])
            online = self._online(views)
            pairs = [(i, j) for i in range(self.num_global_crops) for j in range(self.num_crops) if i != j]
        else:
            targets = self._target(views[:1])
            online = [None] + self._online(views[1:])
            pairs = [(0, j) for j in range(1, self.num_crops)]
        k_globals = [concat_all_gather(k) for k in targets]
        device = views[0].device
        with torch.autocast(device.type, enabled=False):
            terms = [_sce_terms(at_least_fp32(online[j][2]), at_least_fp32(targets[i]), queue, coeff, self.temp,
                                temp_m, at_least_fp32(k_globals[i]), self.use_keys) for i, j in pairs]
        loss = torch.stack([t[0] for t in terms]).mean()
        if self.queue is not None and self.training:
            self._pending_keys.append(torch.cat(k_globals).to(self.queue.dtype))
        first = online[0] if self.sym else online[1]

        def scalar(v):
            return torch.full((), float(v), device=device)

        logs = {'coeff': scalar(coeff), 'temp_m': scalar(temp_m), 'momentum': scalar(self.current_momentum()),
                'pos_weight': torch.stack([t[1] for t in terms]).mean().detach(),
                # collapse measures: per-dimension std of normalised embeddings, ~1/sqrt(D) spread, 0 collapsed
                'z_std': F.normalize(first[1].detach().float(), dim=1).std(0).mean(),
                'k_std': F.normalize(targets[0].float(), dim=1).std(0).mean()}
        if self.queue is not None:
            size = self.queue.shape[1]
            keys_per_step = sum(len(k) for k in self._pending_keys)  # known from this forward (also after a resume)
            logs['queue_fill'] = scalar(min(1.0, self.global_step * keys_per_step / size))
        if self.online_evaluator is not None and labels is not None and self.training:
            logs.update(self.online_evaluator.step(first[0], labels.to(device)))
        return loss, logs

    # ----- after the optimizer step (SCEHook)
    @torch.no_grad()
    def enqueue_pending(self):
        """Writes the kept keys at the pointer (wrapping around) and moves it; no host sync."""
        if self.queue is None or not self._pending_keys:
            return
        keys = torch.cat(self._pending_keys)
        self._pending_keys = []
        size = self.queue.shape[1]
        if len(keys) > size:
            raise ValueError(f'--queue_size {size} is smaller than the {len(keys)} keys of one step')
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    @torch.no_grad()
    def momentum_update(self, momentum):
        """theta' <- m theta' + (1 - m) theta for trunk and projector parameters (not BN buffers)."""
        for online, target in ((self.trunk, self.momentum_trunk), (self.projector, self.momentum_projector)):
            target_params = list(target.parameters())
            torch._foreach_mul_(target_params, momentum)
            torch._foreach_add_(target_params, list(online.parameters()), alpha=1 - momentum)


def convert_sync_batchnorm(model):
    """Every BN (online and target, trunk and heads) to SyncBatchNorm, as Lightning's sync_batchnorm=True.
    Only under DDP on CUDA (gloo/CPU has no SyncBatchNorm); otherwise the model is returned unchanged."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    if not next(model.parameters()).is_cuda:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
