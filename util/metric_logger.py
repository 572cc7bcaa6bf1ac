"""Training progress without a host sync per step.

Metrics arrive as device tensors and are summed on the device; they are copied to the host only on
print steps (every `print_freq` and the last one), where one line shows the window and epoch
averages, ETA, images/s and the share of time spent waiting for data.
"""
import datetime
import time

import torch

from util.dist import all_reduce_sum


class MetricLogger:
    def __init__(self, num_steps, print_freq=50, header='', images_per_step=1):
        self.num_steps = num_steps
        self.print_freq = max(1, print_freq)
        self.header = header
        self.images_per_step = images_per_step  # over all processes
        self.on_print = []  # callbacks(step, window_means: dict, images_per_s, seconds_per_step)
        # name -> function returning a running total (e.g. unreadable files), read at print steps; may be a
        # collective, since every process prints at the same steps. Shown when not 0, and given to on_print.
        self.counters = {}
        self._window, self._total = {}, {}  # name -> [sum, count]; a metric may skip steps (frozen stages)
        self.last_window = {}

    def update(self, **values):
        """Adds one step's values (tensors stay on their device; floats are kept as floats)."""
        for name, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            for sums in (self._window, self._total):
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value, count + 1)

    def sums(self):
        """The epoch's sums and counts so far, as plain numbers (one host sync), for a mid-epoch checkpoint."""
        return {k: (float(v), n) for k, (v, n) in self._total.items()}

    def load_sums(self, sums):
        self._total = dict(sums)

    def log_every(self, iterable, first_step=0):
        """Yields the batches of `iterable` (steps first_step, first_step + 1, ...), timing data wait vs the
        rest, and prints on print steps."""
        start = window_start = time.perf_counter()
        data_wait = 0.0
        steps_in_window = 0
        iterator = iter(iterable)
        for step in range(first_step, self.num_steps):
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t0
            yield batch
            steps_in_window += 1
            if (step + 1) % self.print_freq == 0 or step + 1 == self.num_steps:
                self.last_window = {k: float(v) / n for k, (v, n) in self._window.items()}  # the host sync
                now = time.perf_counter()
                elapsed = now - window_start
                images_per_s = steps_in_window * self.images_per_step / max(elapsed, 1e-9)
                eta = (now - start) / (step + 1 - first_step) * (self.num_steps - step - 1)
                counts = {name: count() for name, count in self.counters.items()}
                self._print(step, eta, images_per_s, elapsed / steps_in_window, data_wait / max(elapsed, 1e-9),
                            counts)
                for callback in self.on_print:
                    callback(step, {**self.last_window, **counts}, images_per_s, elapsed / steps_in_window)
                self._window = {}
                window_start, data_wait, steps_in_window = now, 0.0, 0
        self.epoch_time = time.perf_counter() - start

    def _print(self, step, eta, images_per_s, seconds_per_step, data_share, counts):
        total = {k: float(v) / n for k, (v, n) in self._total.items()}
        metrics = '  '.join([f'{k}: {v:.4g} ({total[k]:.4g})' for k, v in self.last_window.items()] +
                            [f'{k}: {v}' for k, v in counts.items() if v])
        mem = f'  mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB' if torch.cuda.is_available() else ''
        width = len(str(self.num_steps))
        print(f'{self.header} [{step + 1:>{width}}/{self.num_steps}]  eta: {datetime.timedelta(seconds=int(eta))}  '
              f'{metrics}  img/s: {images_per_s:.1f}  s/step: {seconds_per_step:.3f}  data: {100 * data_share:.0f}%{mem}', flush=True)

    def global_averages(self, device):
        """Epoch means over all steps of all processes (one all-reduce)."""
        names = sorted(self._total)
        if not names:
            return {}
        sums = torch.stack([torch.as_tensor(self._total[k][0], dtype=torch.float64, device=device).reshape(())
                            for k in names])
        counts = torch.tensor([float(self._total[k][1]) for k in names], dtype=torch.float64, device=device)
        sums, counts = all_reduce_sum(sums).tolist(), all_reduce_sum(counts).tolist()
        return {k: s / n for k, s, n in zip(names, sums, counts)}
