"""One epoch of self-supervised pretraining: the model takes a batch and returns its loss.

Per step: set the lr at the start of each accumulation window (warmup + cosine, fractional epoch),
forward under autocast, backward (no DDP all-reduce until the window's last micro-step), and step
the optimizer at the window's end. Method logic that must run after an optimizer step plugs in as
`hooks` (objects with `after_step(model, optimizer, num_updates)`). Metrics stay on the device until
a print step.
"""
from util.dist import get_world_size
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger


def tensorboard_callback(log_writer, epoch, steps_per_epoch):
    """Writes the print-window means at x = epoch_1000x (MAE's convention, comparable across batch sizes)."""
    def write(step, window, images_per_s):
        x = int((step / steps_per_epoch + epoch) * 1000)
        for name, value in window.items():
            log_writer.add_scalar('train_loss' if name == 'loss' else ('lr' if name == 'lr' else f'train/{name}'),
                                  value, x)
        log_writer.add_scalar('perf/images_per_s', images_per_s, x)
    return write


def train_one_epoch(model, data_loader, trainer, device, epoch, args, log_writer=None, hooks=()):
    model.train()
    steps = len(data_loader)
    meter = MetricLogger(steps, args.print_freq, f'Epoch: [{epoch}]',
                         images_per_step=args.batch_size * get_world_size())
    meter.on_print.append(lambda *_: trainer.check())
    if log_writer is not None:
        meter.on_print.append(tensorboard_callback(log_writer, epoch, steps))
    optimizer = trainer.optimizer
    for step, (samples, _) in enumerate(meter.log_every(data_loader)):
        if step % trainer.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, step / steps + epoch, args)
        samples = samples.to(device, non_blocking=True)
        update = trainer.is_update(step)
        with trainer.no_sync_unless(update):
            with trainer.autocast():
                out = model(samples, mask_ratio=args.mask_ratio)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            trainer.backward(loss)
        if update:
            trainer.step()
            for hook in hooks:
                hook.after_step(model, optimizer, trainer.num_updates)
        meter.update(loss=loss, lr=lr, grad_norm=trainer.grad_norm, **logs)  # grad_norm: last optimizer step
    trainer.discard_partial_window()
    stats = meter.global_averages(device)
    stats['epoch_time'] = meter.epoch_time
    return stats
