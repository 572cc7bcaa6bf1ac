"""Hooks: method logic that runs after every optimizer step, outside the engine's loop.

A hook is any object with `after_step(trainer)`; `util.train_step.TrainStep.step` calls it once per
optimizer step, after the update and before the gradients are zeroed (so it may read them), with
`trainer.num_updates` already counting the step. Hooks that carry state across a resume also have
`state_dict()` / `load_state_dict(state)`; the entry script saves them in the checkpoint. The other
hook of the repository is SLaK's `util.slak.sparse_training.Masking` (prune and regrow).
"""
import copy

from timm.utils import ModelEmaV3

from util.dist import unwrap
from util.slak.sparse_training import masked_ema_update


class ModelEmaHook:
    """An exponential moving average of the weights (and buffers), updated after every optimizer step.

    Wraps timm's ModelEmaV3 around the bare model (not the DDP wrapper: every rank holds the same
    weights after a step, so each keeps an identical EMA without communication). Following timm's
    train.py the update gets `step=trainer.num_updates`: the first update copies the weights (decay 0),
    later ones use `decay` (or, with `warmup`, timm's rising decay 1 - (1 + step)^(-2/3), capped at decay).
    `state_dict()` holds the EMA model's own keys, so a saved EMA loads into a plain model too.
    """

    def __init__(self, model, decay=0.9999, warmup=False, device=None):
        self.ema = ModelEmaV3(unwrap(model), decay=decay, use_warmup=warmup, device=device)

    @property
    def module(self):
        """The EMA model (eval mode), e.g. for `evaluate(loader, ema.module, ...)`."""
        return self.ema.module

    def after_step(self, trainer):
        self.ema.update(unwrap(trainer.model), step=trainer.num_updates)

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, state):
        self.ema.module.load_state_dict(state)


class MaskedEmaHook:
    """EMA of the weights (and buffers) that respects the masks, as the official ModelEma.update(model, mask):
    a constant decay per optimizer step, no warm-up. The same interface as ModelEmaHook
    (`module`, `after_step`, `state_dict`); list it after the Masking hook so it sees this step's masks."""

    def __init__(self, model, masking, decay=0.9999, device=None):
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.masking, self.decay = masking, decay

    def after_step(self, trainer):
        masked_ema_update(self.module, unwrap(trainer.model), self.masking.masks, self.decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)


class SCEHook:
    """Engine hook: after optimizer step s (trainer.num_updates = s + 1) enqueue the step's keys, then update
    the target with m(s), and count the step for the schedules."""

    def __init__(self, sce):
        self.sce = unwrap(sce)

    def after_step(self, trainer):
        sce = self.sce
        sce.enqueue_pending()
        sce.momentum_update(sce.current_momentum(trainer.num_updates - 1))
        sce.global_step = trainer.num_updates
