"""LARS as MAE's linear probe (https://github.com/facebookresearch/mae/blob/main/util/lars.py) and SCE
(eztorch's `optimizers/lars.py`) use it.

For a parameter p with gradient g, weight decay wd, trust coefficient eta:
  p.ndim > 1:  d = g + wd * p;  d *= eta * |p| / |d|  (ratio 1 when |p| or |d| is 0; Frobenius norms)
  p.ndim <= 1: d = g            (BN gamma/beta, biases: no weight decay and no trust ratio)
  mu = momentum * mu + d        (mu starts at 0, no dampening, no Nesterov);   p -= lr * mu

Why not timm's `Lars`: its momentum defaults to 0, its ratio is eta * |p| / (|g| + wd * |p| + eps), not
eta * |p| / |g + wd * p|, its zero test looks at |g| instead of |d|, it applies the ratio only when the group has
weight decay (or always_adapt), and then adapts and decays 1-D parameters too.
No host sync: the ratio is chosen with torch.where.
"""
import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=1e-3):
        if lr < 0 or weight_decay < 0 or momentum < 0 or trust_coefficient <= 0:
            raise ValueError(f'LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum} '
                             f'or trust_coefficient={trust_coefficient}')
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, momentum = group['weight_decay'], group['trust_coefficient'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=wd)
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm,
                                        torch.ones_like(p_norm))
                    d = d.mul(ratio)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(momentum).add_(d)
                p.add_(mu, alpha=-group['lr'])
        return loss
