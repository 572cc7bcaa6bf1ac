"""Test helpers shared by the entry-script tests (not collected: no test_ prefix)."""
import contextlib

import pytest


class Interrupted(Exception):
    """A run killed between two epochs."""


@contextlib.contextmanager
def killed_at_epoch(script, epoch):
    """Within the block, `script.train_one_epoch` raises Interrupted on reaching `epoch` (after the previous
    epoch's checkpoint was written), and the block must end with that interruption."""
    real = script.train_one_epoch

    def train_until(loader, trainer, current, *args, **kwargs):
        if current == epoch:
            raise Interrupted
        return real(loader, trainer, current, *args, **kwargs)

    script.train_one_epoch = train_until
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        script.train_one_epoch = real
