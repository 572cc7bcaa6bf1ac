"""SCE's step hook: the queue and the momentum target (a hook, see util/hooks.py; the model is models/sce.py)."""
from util.dist import unwrap


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
