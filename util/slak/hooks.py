"""SLaK's weight EMA: an EMA that respects the sparse-training masks (a hook, see util/hooks.py)."""
import copy

from util.dist import unwrap
from util.slak.sparse_training import masked_ema_update


class MaskedEmaHook:
    """EMA of the weights (and buffers) that respects the masks, as the official ModelEma.update(model, mask):
    a constant decay per optimizer step, no warm-up. The same interface as util.hooks.ModelEmaHook
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
