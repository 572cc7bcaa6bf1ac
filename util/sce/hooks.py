"""SCE's step hook: the queue and the momentum target (a hook, see util/hooks.py; the model is models/sce.py)."""
from util.dist import unwrap

TEACHER_UPDATES = ('step', 'micro_batch')


class SCEHook:
    """Engine hook: after optimizer step s (trainer.num_updates = s + 1) enqueue the step's keys, count the step
    for the schedules and, with teacher_update 'step', update the target with m(s).

    teacher_update 'micro_batch' is eztorch's rule under Lightning's accumulate_grad_batches: the target is
    updated after every micro-batch (on_train_batch_end), each with the momentum of the window's step, m(s), so
    all but the last update of a window see a student that has not stepped yet."""

    def __init__(self, sce, teacher_update='step'):
        if teacher_update not in TEACHER_UPDATES:
            raise ValueError(f'--teacher_update {teacher_update!r}: expected one of {TEACHER_UPDATES}')
        self.sce, self.teacher_update = unwrap(sce), teacher_update

    def after_step(self, trainer):
        sce = self.sce
        sce.enqueue_pending()
        if self.teacher_update == 'step':
            sce.momentum_update(sce.current_momentum(trainer.num_updates - 1))
        sce.global_step = trainer.num_updates

    def after_micro_batch(self, trainer, stepped):
        """After each micro-batch's backward, and after the optimizer step when `stepped` ended a window."""
        if self.teacher_update == 'micro_batch':
            self.sce.momentum_update(self.sce.current_momentum(trainer.num_updates - stepped))
