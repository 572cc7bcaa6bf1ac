"""The signals that stop a run (SIGTERM, SIGUSR1; util/preemption.py turns them into a mid-epoch checkpoint) and
the DataLoader workers: they ignore those signals, and any left at exit are killed."""
import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit handler is registered first, so it runs after ours)
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id=None):
    """DataLoader `worker_init_fn`: workers leave the signal to the main process (and exit with it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers():
    """At exit, daemonic children (DataLoader workers, which ignore SIGTERM) are killed: multiprocessing's own exit
    handler, which runs after this one, would send them SIGTERM and wait for them forever."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would report them as failed
    for child in children:
        child.kill()
