"""One epoch of self-supervised pretraining: the model takes a batch and returns its loss.

Per step: set the lr at the start of each accumulation window (warmup + cosine, fractional epoch),
forward under autocast, backward (no DDP all-reduce until the window's last micro-step), and step
the optimizer at the window's end. Method logic plugs in as objects, not branches: the `schedule`
(lrs, and freezing for FreezeOut) and `hooks` run after each optimizer step (`after_step(trainer)`).
Metrics stay on the device until a print step.
"""
from util.dist import get_world_size
from util.lr_sched import WarmupCosine
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


def masked_modeling_loss(args):
    """The default `compute_loss`: the model takes the images and returns its loss (and logs)."""
    return lambda model, samples, targets: model(samples, mask_ratio=args.mask_ratio)


def train_one_epoch(data_loader, trainer, device, epoch, args, log_writer=None, schedule=None, hooks=(),
                    compute_loss=None):
    """`schedule.adjust(optimizer, epoch)` sets the lrs at each window start (default: warmup + cosine);
    it may also change the model (FreezeOut), so every step uses `trainer.model`.
    `compute_loss(model, samples, targets)` -> loss or (loss, logs), run under autocast."""
    schedule = schedule or WarmupCosine(args)
    compute_loss = compute_loss or masked_modeling_loss(args)
    trainer.model.train()
    steps = len(data_loader)
    meter = MetricLogger(steps, args.print_freq, f'Epoch: [{epoch}]',
                         images_per_step=args.batch_size * get_world_size())
    meter.on_print.append(lambda *_: trainer.check())
    if log_writer is not None:
        meter.on_print.append(tensorboard_callback(log_writer, epoch, steps))
    for step, (samples, targets) in enumerate(meter.log_every(data_loader)):
        if step % trainer.accum_iter == 0:
            lr = schedule.adjust(trainer.optimizer, step / steps + epoch)
        samples = samples.to(device, non_blocking=True)
        update = trainer.is_update(step)
        with trainer.no_sync_unless(update):
            with trainer.autocast():
                out = compute_loss(trainer.model, samples, targets)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            trainer.backward(loss)
        if update:
            trainer.step(hooks)
        # grad_norm: of the last optimizer step
        meter.update(loss=loss, lr=lr, grad_norm=trainer.grad_norm, **logs, **schedule.metrics())
    trainer.discard_partial_window()
    stats = meter.global_averages(device)
    stats['epoch_time'] = meter.epoch_time
    return stats
