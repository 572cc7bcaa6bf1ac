"""SLaK's dynamic sparse training: masks over the 2-D/4-D weights, pruned and regrown during training.

`Masking` keeps one boolean mask per weight, keyed by the parameter names of the bare model (no DDP
`module.` prefix), so the same masks apply to an EMA copy and load into any run of the model. It is an
engine hook: after every optimizer step (whatever the precision) `after_step` zeroes the masked weights,
advances the cosine prune-rate decay and, every `update_frequency` steps, removes the `prune_rate` fraction
of each layer's active weights with the smallest magnitude (active weights at exactly zero tie with the inactive
ones, as officially) and regrows as many at zero positions (randomly, or where |gradient| or |Adam momentum| is
largest). Regrown weights start at zero. Masks are part of
`state_dict()` and are broadcast from rank 0 only when they change.

As officially, SNIP scores only set per-layer densities (the masks are random) and masks at least 99%
dense after initialisation are dropped.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.dist import unwrap

SPARSE_INITS = ('uniform', 'ERK', 'snip', 'resume')
PRUNE_MODES = ('magnitude',)
GROWTH_MODES = ('random', 'gradient', 'momentum')
REDISTRIBUTION_MODES = ('none', 'momentum', 'magnitude', 'nonzeros')
DENSE_AFTER_INIT = 0.99  # masks at least this dense after initialisation are dropped
LARGE_KERNEL = 'large_kernel.LoRA'


def add_sparse_args(parser):
    group = parser.add_argument_group('sparse training')
    group.add_argument('--sparse', action='store_true', help='enable dynamic sparse training')
    group.add_argument('--sparsity', type=float, default=0.4, help='global sparsity; density = 1 - sparsity')
    group.add_argument('--sparse_init', type=str, default='snip',
                       help='mask initialisation: ' + ', '.join(SPARSE_INITS))
    group.add_argument('--prune', type=str, default='magnitude', help='pruning mode: magnitude')
    group.add_argument('--growth', type=str, default='random', help='growth mode: ' + ', '.join(GROWTH_MODES))
    group.add_argument('--redistribution', type=str, default='none', help='unused (as in the official code)')
    group.add_argument('--prune_rate', type=float, default=0.3, help='initial fraction pruned per event')
    group.add_argument('-u', '--update-frequency', dest='update_frequency', type=int, default=100,
                       help='optimizer steps between prune/grow events')
    group.add_argument('--fix', action='store_true', help='static masks (no prune/grow)')
    group.add_argument('--only-L', dest='only_L', action='store_true', help='mask only the large-kernel strips')
    group.add_argument('--verbose', action='store_true', help='per-layer counts at every prune/grow event')
    return parser



def density_from_sparsity(sparsity):
    if not 0 <= sparsity < 1:
        raise ValueError(f'--sparsity must be in [0, 1), got {sparsity}')
    return 1.0 - sparsity


class CosineDecay:
    """The prune rate after t steps, eta_min + (p0 - eta_min)(1 + cos(pi t / T_max)) / 2, stepped before each read
    and computed as the official code computes it: torch's CosineAnnealingLR on a dummy optimizer whose lr is the
    rate. Its recursive form differs from the closed form in the last bit at some steps (0.15250000000000002 against
    0.1525), enough to prune one weight more or less."""

    def __init__(self, prune_rate, T_max, eta_min=0.005, init_step=0):
        if T_max <= 0:
            raise ValueError(f'the prune-rate decay needs a positive number of steps, got {T_max}')
        self.prune_rate, self.T_max, self.eta_min = prune_rate, T_max, eta_min
        self._restart(init_step)

    def _restart(self, steps):
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.prune_rate)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, self.T_max, self.eta_min)
        self.optimizer.step()  # nothing to update; keeps torch from warning that the scheduler steps first
        self.t = 0
        for _ in range(steps):  # the official resume: replay every step
            self.step()

    def step(self):
        self.scheduler.step()
        self.t += 1

    def get_dr(self):
        return self.optimizer.param_groups[0]['lr']

    def state_dict(self):
        return {'t': self.t}

    def load_state_dict(self, state):
        self._restart(state['t'])


def erk_densities(shapes, density):
    """Erdős–Rényi–Kernel: density_l = eps * sum(shape_l) / numel_l, layers that would exceed 1 made dense."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense = set()
    while len(dense) < len(raw):
        sparse = [n for n in raw if n not in dense]
        eps = (budget - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in sparse)
        largest = max(raw[n] for n in sparse)
        if eps * largest <= 1:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= {n for n in sparse if raw[n] == largest}
    return {n: 1.0 for n in shapes}


def snip_densities(model, names, density, loss_fn):
    """Per-layer densities from SNIP scores |w * dL/dw| of one batch on a (train-mode) copy of the model:
    the share of each layer's scores strictly above the k-th largest overall, k = int(N * density)."""
    net = copy.deepcopy(model).train()
    net.zero_grad(set_to_none=True)
    loss_fn(net).backward()
    params = dict(net.named_parameters())
    scores = {n: (params[n].detach() * params[n].grad).abs() if params[n].grad is not None
              else torch.zeros_like(params[n]) for n in names}
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(flat.numel() * density)
    if k == 0:
        return {n: 0.0 for n in names}
    threshold = torch.topk(flat, k).values[-1]
    return {n: (s > threshold).float().mean().item() for n, s in scores.items()}


def snip_loss_on_batch(images, targets):
    """SNIP's loss: cross-entropy on one batch of integer labels (no mixup), as officially."""
    return lambda model: F.cross_entropy(model(images), targets)


def _broadcast_masks(masks):
    """Rank 0's masks on every rank, in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not masks:
        return
    flat = torch.cat([m.reshape(-1).view(torch.uint8) for m in masks.values()])
    dist.broadcast(flat, src=0)
    start = 0
    for m in masks.values():
        m.view(-1).copy_(flat[start:start + m.numel()].bool())
        start += m.numel()


class Masking:
    """Masks of a model's weights, applied after each optimizer step and pruned/regrown every
    `update_frequency` steps (never with `fix`). Use as an engine hook; checkpoint with state_dict()."""

    def __init__(self, optimizer, prune_rate=0.3, growth_mode='random', prune_mode='magnitude',
                 redistribution_mode='none', prune_rate_decay=None, update_frequency=100, fix=False, verbose=False):
        for flag, value, choices in (('--growth', growth_mode, GROWTH_MODES), ('--prune', prune_mode, PRUNE_MODES),
                                     ('--redistribution', redistribution_mode, REDISTRIBUTION_MODES)):
            if value not in choices:
                raise ValueError(f'{flag} must be one of {list(choices)}, got {value!r}')
        if not 0 <= prune_rate <= 1:
            raise ValueError(f'--prune_rate must be in [0, 1], got {prune_rate}')
        if not fix and (update_frequency is None or update_frequency < 1):
            raise ValueError(f'-u/--update-frequency must be a positive number of steps, got {update_frequency}')
        self.optimizer = optimizer
        self.prune_rate, self.growth_mode, self.prune_mode = prune_rate, growth_mode, prune_mode
        self.prune_rate_decay = prune_rate_decay
        self.update_frequency = None if fix else update_frequency
        self.verbose = verbose
        self.model = None    # the bare model
        self.masks = {}      # name -> bool tensor, on the weight's device
        self.params = {}     # name -> parameter of the bare model
        self.dense = {}      # name -> numel of weights eligible for masking but kept dense
        self.steps = 0       # optimizer steps seen
        self.last_event = {}  # name -> [pruned, grown] at the last prune/grow event

    @classmethod
    def from_args(cls, optimizer, args, total_steps, init_step=0):
        """From main_slak's flags; `total_steps` = optimizer steps of the whole run (the decay's T_max)."""
        density_from_sparsity(args.sparsity)
        decay = CosineDecay(args.prune_rate, total_steps, init_step=init_step)
        return cls(optimizer, args.prune_rate, args.growth, args.prune, args.redistribution, decay,
                   args.update_frequency, args.fix, args.verbose)

    def add_module(self, model, sparse_init='snip', density=0.6, only_L=False, snip_loss=None):
        """Builds the masks of `model`'s 2-D/4-D weights (only the large-kernel strips with `only_L`).
        `snip_loss`: for snip, a callable model -> loss, or an (images, integer labels) batch."""
        if sparse_init not in SPARSE_INITS:
            raise ValueError(f'--sparse_init must be one of {list(SPARSE_INITS)}, got {sparse_init!r}')
        if not 0 < density <= 1:
            raise ValueError(f'density must be in (0, 1] (--sparsity in [0, 1)), got {density}')
        model = self.model = unwrap(model)
        self.params = {n: p for n, p in model.named_parameters()
                       if p.dim() in (2, 4) and (not only_L or LARGE_KERNEL in n)}
        if not self.params and only_L:
            raise ValueError(f'--only-L: the model has no large-kernel strip weights (names with {LARGE_KERNEL!r}); '
                             'build it with --Decom True')
        if not self.params:
            raise ValueError('--sparse: the model has no 2-D/4-D weights to mask')
        if sparse_init == 'resume':
            self.masks = {n: p.detach() != 0 for n, p in self.params.items()}
        else:
            if sparse_init == 'uniform':
                densities = {n: density for n in self.params}
            elif sparse_init == 'ERK':
                densities = erk_densities({n: tuple(p.shape) for n, p in self.params.items()}, density)
            else:
                if snip_loss is None:
                    raise ValueError('--sparse_init snip needs a training batch (snip_loss)')
                if not callable(snip_loss):
                    device = next(iter(self.params.values())).device
                    snip_loss = snip_loss_on_batch(*(t.to(device) for t in snip_loss))
                densities = snip_densities(model, list(self.params), density, snip_loss)
            self.masks = {n: (torch.rand(p.shape) < densities[n]).to(p.device) for n, p in self.params.items()}
        _broadcast_masks(self.masks)
        for n, m in list(self.masks.items()):
            if m.float().mean().item() >= DENSE_AFTER_INIT:
                del self.masks[n]
                self.dense[n] = m.numel()
        self.params = {n: self.params[n] for n in self.masks}
        self.apply_mask()
        self.print_summary(f'sparse init {sparse_init}, target density {density:.4f}')

    # ---- the engine hook ----

    def after_step(self, trainer):
        self.step()

    def step(self):
        """After an optimizer step: mask, decay the prune rate, prune and regrow every update_frequency steps."""
        self.apply_mask()
        if self.prune_rate_decay is not None:
            self.prune_rate_decay.step()
            self.prune_rate = self.prune_rate_decay.get_dr()
        self.steps += 1
        if self.update_frequency is not None and self.steps % self.update_frequency == 0:
            self.truncate_weights()

    @torch.no_grad()
    def apply_mask(self):
        for n, m in self.masks.items():
            p = self.params[n]
            p.mul_(m)
            buf = self.optimizer.state.get(p, {}).get('momentum_buffer')
            if buf is not None:
                buf.mul_(m)

    @torch.no_grad()
    def apply_to(self, module):
        """Zeroes the masked weights of another module with the same parameter names (e.g. an EMA copy)."""
        for n, m in self.masks.items():
            p = unwrap(module).get_parameter(n)
            p.mul_(m.to(p.device))

    @torch.no_grad()
    def truncate_weights(self):
        """One prune/grow event: prune every layer, then grow every layer (the official order of RNG draws)."""
        pruned = {n: self.prune(n) for n in self.masks}
        grown = {n: self.grow(n, k) for n, k in pruned.items()}
        _broadcast_masks(self.masks)
        self.apply_mask()
        self.last_event = {n: [pruned[n], grown[n]] for n in self.masks}
        print(f'sparse step {self.steps}: prune rate {self.prune_rate:.4f}, pruned {sum(pruned.values())}, '
              f'grown {sum(grown.values())}, density {self.densities()["density"]:.4f}')
        if self.verbose:
            for n, (p, g) in self.last_event.items():
                print(f'  {n}: pruned {p}, grown {g}, active {int(self.masks[n].sum())}')

    def prune(self, name):
        """Magnitude pruning as SLaK's funcs.py magnitude_prune: with num_remove = ceil(prune_rate * active), the
        (inactive + num_remove) entries of smallest |w| over the whole tensor are deactivated. Inactive weights are
        0, so active weights that are exactly 0 (kernel taps that only ever see padding, weights regrown at 0) tie
        with them and torch.sort's order decides how many of those go on top; with num_remove 0 every zero weight
        goes. Returns the number of active weights removed."""
        mask, weight = self.masks[name], self.params[name].detach()
        active = int(mask.sum())
        num_remove = math.ceil(self.prune_rate * active)
        if num_remove == 0:
            mask &= weight != 0
        else:
            order = torch.sort(weight.abs().view(-1)).indices
            mask.view(-1)[order[:mask.numel() - active + num_remove]] = False
        return active - int(mask.sum())

    def grow(self, name, n):
        """Reactivates about (random) or exactly (gradient, momentum) `n` weights at inactive positions."""
        if n == 0:
            return 0
        mask = self.masks[name]
        before = int(mask.sum())
        if self.growth_mode == 'random':
            # each inactive position (just pruned ones included) with probability n / #inactive
            p = n / (mask.numel() - before)
            mask |= (torch.rand(mask.shape) < p).to(mask.device)
            return int(mask.sum()) - before
        score = torch.nan_to_num(self.growth_score(name).abs(), nan=0.0, posinf=0.0)
        score = torch.where(mask, -math.inf, score)
        mask.view(-1)[torch.topk(score.flatten(), n).indices] = True
        return n

    def growth_score(self, name):
        p = self.params[name]
        if self.growth_mode == 'gradient':
            return p.grad if p.grad is not None else torch.zeros_like(p)
        state = self.optimizer.state.get(p, {})
        if 'exp_avg' in state:
            return state['exp_avg'] / (state['exp_avg_sq'].sqrt() + 1e-8)
        if 'momentum_buffer' in state:
            return state['momentum_buffer']
        return torch.zeros_like(p)

    # ---- logging and checkpoints ----

    def densities(self):
        """{'density': overall over the eligible weights (dense-kept layers count as dense),
        'density/<name>': per masked layer, 'nonzero_params': parameters not masked out, whole model}."""
        active = torch.stack([m.sum() for m in self.masks.values()]).tolist() if self.masks else []
        sizes = [m.numel() for m in self.masks.values()]
        total = sum(sizes) + sum(self.dense.values())
        stats = {'density': (sum(active) + sum(self.dense.values())) / total if total else 1.0}
        stats.update({f'density/{n}': a / s for n, a, s in zip(self.masks, active, sizes)})
        stats['nonzero_params'] = float(sum(p.numel() for p in self.model.parameters()) - sum(sizes) + sum(active))
        return stats

    def print_summary(self, title):
        stats = self.densities()
        print(f'{title}: {len(self.masks)} masked tensors, overall density {stats["density"]:.4f} '
              f'(sparsity {1 - stats["density"]:.4f})')
        for n, m in self.masks.items():
            print(f'  {n} {tuple(m.shape)}: density {stats[f"density/{n}"]:.4f}')
        if self.dense:
            print(f'  kept dense: {", ".join(self.dense)}')

    def state_dict(self):
        return {'masks': {n: m.clone() for n, m in self.masks.items()}, 'dense': dict(self.dense),
                'steps': self.steps, 'prune_rate': self.prune_rate, 'last_event': dict(self.last_event),
                'decay': self.prune_rate_decay.state_dict() if self.prune_rate_decay is not None else None}

    def load_state_dict(self, state, model=None):
        """Restores masks (exactly), step counter, prune rate and decay, then re-applies the masks.
        Needs the model: from an earlier add_module, or given here."""
        if model is not None:
            self.model = unwrap(model)
        if self.model is None:
            raise RuntimeError('Masking.load_state_dict needs the model: call add_module first or pass model=')
        named = dict(self.model.named_parameters())
        unknown = [n for n in state['masks'] if n not in named or named[n].shape != state['masks'][n].shape]
        if unknown:
            raise ValueError(f'sparse masks do not fit this model: {unknown[:3]}; check --model and its flags')
        self.masks = {n: m.to(device=named[n].device, dtype=torch.bool, copy=True)
                      for n, m in state['masks'].items()}
        self.params = {n: named[n] for n in self.masks}
        self.dense = dict(state.get('dense', {}))
        self.steps, self.prune_rate = state['steps'], state['prune_rate']
        self.last_event = dict(state.get('last_event', {}))
        if self.prune_rate_decay is not None and state.get('decay') is not None:
            self.prune_rate_decay.load_state_dict(state['decay'])
        self.apply_mask()


@torch.no_grad()
def masked_ema_update(ema_model, model, masks, decay):
    """SLaK's EMA step: ema = ema*d + model*(1-d) for every entry of the state dict, then masked weights
    are multiplied by their mask and positions active but zero in the EMA (newly grown) copy the model."""
    live = model.state_dict()
    for k, ema_v in ema_model.state_dict().items():
        model_v = live[k].detach().to(ema_v.device)
        new = ema_v * decay + model_v * (1 - decay)
        if k in masks:
            mask = masks[k].to(ema_v.device)
            new = new * mask + (mask & (ema_v == 0)) * decay * model_v
        ema_v.copy_(new)  # integer buffers (num_batches_tracked) are truncated, as officially
