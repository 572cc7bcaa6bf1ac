"""Hooks: method logic that runs after every optimizer step, outside the engine's loop.

A hook is any object with `after_step(trainer)`; `util.train_step.TrainStep.step` calls it once per
optimizer step, after the update and before the gradients are zeroed (so it may read them), with
`trainer.num_updates` already counting the step. Hooks that carry state across a resume also have
`state_dict()` / `load_state_dict(state)`; the entry script saves them in the checkpoint. The weight EMA
here is shared; the methods' own hooks live with their methods: SLaK's `util.slak.sparse_training.Masking`
(prune and regrow) and `util.slak.hooks.MaskedEmaHook`, SCE's `util.sce.hooks.SCEHook` (queue and momentum).
"""
from timm.utils import ModelEmaV3

from util.dist import unwrap


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
