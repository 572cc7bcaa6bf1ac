"""What happens around every backward and optimizer step, for every method's engine.

`TrainStep` owns gradient accumulation (DDP `no_sync` on the micro-steps before the last one),
autocast (bf16 or fp16; a GradScaler only for fp16), optional gradient-norm clipping (only for a
clip_grad > 0; None or 0 means none, as the official scripts) and the handling
of non-finite losses: such a step is skipped on the device (fused optimizers take a `found_inf`
flag, as under GradScaler) and counted; `check()`, called at print time, stops the run with a
clear message after `max_nonfinite` skipped steps in a row. Nothing here syncs with the host per
step unless the optimizer is not fused.
"""
import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}


class NonFiniteLossError(RuntimeError):
    pass


class TrainStep:
    def __init__(self, model, optimizer, device, amp='none', accum_iter=1, clip_grad=None, max_nonfinite=5):
        if amp not in AMP_DTYPES:
            raise ValueError(f'--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}')
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.max_nonfinite = max_nonfinite
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == 'fp16' else None
        self.fused = bool(optimizer.defaults.get('fused'))
        self.num_updates = 0
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        self.skipped, self.consecutive, self.worst_run = zero.clone(), zero.clone(), zero.clone()
        self._window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)

    def is_update(self, step):
        return (step + 1) % self.accum_iter == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def no_sync_unless(self, update):
        """DDP all-reduces gradients only on the micro-step that ends an accumulation window."""
        if isinstance(self.model, DistributedDataParallel) and not update:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss):
        self._window_finite &= torch.isfinite(loss.detach())
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _params_with_grad(self):
        return [p for group in self.optimizer.param_groups for p in group['params'] if p.grad is not None]

    def step(self, hooks=()):
        """Clips, steps (unless the window was non-finite), runs each hook's `after_step(self)` and zeroes
        gradients. Hooks see the (unscaled, accumulated) gradients and `num_updates` already counting this
        step; SLaK's gradient-based regrowth needs the former."""
        params = self._params_with_grad()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.clip_grad is not None and self.clip_grad > 0 and grads:  # a clip of 0 or None: no clipping
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)
        finite = self._window_finite.clone()
        if self.scaler is not None:  # fp16 overflow is the scaler's business, not a bad step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            finite &= torch.isfinite(norm)
            if self.fused:
                self.optimizer.found_inf = (~finite).float()
                self.optimizer.step()
                del self.optimizer.found_inf
            elif finite.item():
                self.optimizer.step()
        bad = (~finite).long()
        self.skipped += bad
        self.consecutive = (self.consecutive + 1) * bad
        self.worst_run = torch.maximum(self.worst_run, self.consecutive)
        self._window_finite.fill_(True)
        self.grad_norm = norm.detach()
        self.num_updates += 1
        for hook in hooks:
            hook.after_step(self)
        self.optimizer.zero_grad(set_to_none=True)

    def discard_partial_window(self):
        """Drops gradients of an unfinished accumulation window (end of epoch)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._window_finite.fill_(True)

    def check(self):
        """Host-side: raises NonFiniteLossError after `max_nonfinite` skipped steps in a row."""
        worst = int(self.worst_run)
        if self.max_nonfinite and worst >= self.max_nonfinite:
            raise NonFiniteLossError(
                f'loss or gradients were non-finite for {worst} optimizer steps in a row '
                f'({int(self.skipped)} skipped in all); stopping without saving. Resume from the last '
                f'checkpoint with a lower --blr, --clip_grad, or --amp bf16/none')
        self.worst_run.zero_()

    def state_dict(self):
        return {'scaler': self.scaler.state_dict() if self.scaler is not None else None,
                'num_updates': self.num_updates, 'skipped': int(self.skipped)}

    def load_state_dict(self, state):
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.num_updates = state.get('num_updates', 0)
        self.skipped.fill_(state.get('skipped', 0))
