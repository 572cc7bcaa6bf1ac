"""The one training epoch every entry script runs: pretraining (a model that returns its loss), supervised
training (engine_finetune.classification_loss) and SCE's two-clip loss differ only in `compute_loss`.

The contract (all a method needs to plug in; the loop itself never changes):
- `trainer`: a util.train_step.TrainStep (model, optimizer, device, accumulation, autocast, clipping,
  non-finite steps). The engine reads `trainer.model` at every step, so a schedule may rewrap it.
- `schedule`: `adjust(optimizer, epoch_float) -> lr` sets the param groups' lrs (and anything else, e.g.
  FreezeOut's freezing) at the start of each accumulation window; `metrics() -> dict` adds scalars to the log.
  util.lr_sched.WarmupCosine is MAE's; util.lr_sched.IterationSchedule takes precomputed per-step arrays.
- `compute_loss(model, samples, targets)` -> loss or (loss, dict of scalars to log), run under autocast.
- `hooks`: objects with `after_step(trainer)`, run after each optimizer step (util/hooks.py), and optionally
  `after_micro_batch(trainer, stepped)`, run after every micro-batch (after the step when one ended the window).
- `checkpoints` (optional): a util.preemption.MidEpochCheckpoints, for saves inside the epoch (a stop signal,
  --save_every_steps) and for resuming at the step where the last run stopped.
- `partial_window`: what an epoch does with a last accumulation window it cannot fill, as each script's official
  loop does: 'discard' (MAE: forward and backward, then the gradient is dropped), 'skip' (ConvNeXt / SLaK: those
  batches are not run at all, so BatchNorm statistics never see them) or 'step' (Lightning, SCE: the optimizer
  steps on the partial window, its loss still divided by the accumulation count).
Metrics stay on the device until a print step (no host sync per step). Files the loader could not read are
counted over workers and ranks (util/data/bad_files.py): `skipped_files` in the progress line, TensorBoard and stats.
"""
from util.data.bad_files import bad_files_of
from util.dist import get_world_size
from util.metric_logger import MetricLogger


def tensorboard_callback(log_writer, epoch, steps_per_epoch):
    """Writes the print-window means at x = epoch_1000x (MAE's convention, comparable across batch sizes)."""
    def write(step, window, images_per_s, seconds_per_step):
        x = int((step / steps_per_epoch + epoch) * 1000)
        for name, value in window.items():
            log_writer.add_scalar('train_loss' if name == 'loss' else ('lr' if name == 'lr' else f'train/{name}'),
                                  value, x)
        log_writer.add_scalar('perf/images_per_s', images_per_s, x)
        log_writer.add_scalar('perf/seconds_per_step', seconds_per_step, x)
    return write


def masked_modeling_loss(mask_ratio):
    """`compute_loss` of a masked-image model that takes the images and returns its loss (and logs)."""
    return lambda model, samples, targets: model(samples, mask_ratio=mask_ratio)


def train_one_epoch(data_loader, trainer, epoch, schedule, compute_loss, hooks=(), log_writer=None, print_freq=50,
                    checkpoints=None, partial_window='discard'):
    """One pass over `data_loader`; returns the epoch means of the logged metrics (loss, lr, grad_norm, the
    model's and the schedule's extras) over all processes, and `epoch_time`."""
    device = trainer.device
    trainer.model.train()
    if partial_window not in ('discard', 'skip', 'step'):
        raise ValueError(f"partial_window {partial_window!r}: expected 'discard', 'skip' or 'step'")
    micro_batch_hooks = [hook for hook in hooks if hasattr(hook, 'after_micro_batch')]
    steps = len(data_loader)
    run_steps = steps - steps % trainer.accum_iter if partial_window == 'skip' else steps
    meter = MetricLogger(run_steps, print_freq, f'Epoch: [{epoch}]')
    meter.on_print.append(lambda *_: trainer.check())
    if log_writer is not None:
        meter.on_print.append(tensorboard_callback(log_writer, epoch, steps))
    bad_files = bad_files_of(getattr(data_loader, 'dataset', None))  # any sized iterable of batches is a loader
    if bad_files is not None:
        meter.counters['skipped_files'] = bad_files.count
    if checkpoints is None:
        batches, first_step = iter(data_loader), 0
    else:  # inside the interrupted epoch: past the batches it trained on, with the metric sums so far
        batches, first_step, sums = checkpoints.batches(data_loader, epoch)
        meter.load_sums(sums or {})
    try:
        for step, (samples, targets) in enumerate(meter.log_every(batches, first_step), first_step):
            if step % trainer.accum_iter == 0:
                lr = schedule.adjust(trainer.optimizer, step / steps + epoch)
            meter.images_per_step = len(samples) * get_world_size()
            samples = samples.to(device, non_blocking=True)
            update = trainer.is_update(step) or (partial_window == 'step' and step + 1 == steps)
            with trainer.no_sync_unless(update):
                with trainer.autocast():
                    out = compute_loss(trainer.model, samples, targets)
                loss, logs = out if isinstance(out, tuple) else (out, {})
                trainer.backward(loss)
            if update:
                trainer.step(hooks)
            for hook in micro_batch_hooks:
                hook.after_micro_batch(trainer, update)
            # grad_norm: of the last optimizer step
            meter.update(loss=loss, lr=lr, grad_norm=trainer.grad_norm, **logs, **schedule.metrics())
            if update and checkpoints is not None:
                checkpoints.after_step(trainer, epoch, step + 1, meter.sums)
    finally:  # stopped inside the epoch (a signal, an error): end the loader's workers now, they ignore SIGTERM
        shutdown = getattr(batches, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
    trainer.discard_partial_window()
    stats = meter.global_averages(device)
    stats['epoch_time'] = meter.epoch_time
    if bad_files is not None:
        stats['skipped_files'] = bad_files.count()
    return stats
