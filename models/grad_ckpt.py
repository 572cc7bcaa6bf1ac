"""Activation checkpointing (`--grad_ckpt`) that leaves BatchNorm running statistics as without it.

`torch.utils.checkpoint` (non-reentrant) stores a segment's input only and runs the segment again in the
backward pass; dropout and drop path draw the same random numbers again (the RNG state is restored). A
BatchNorm in train mode would however update its running mean and variance (and `num_batches_tracked`) a
second time during that rerun; `checkpointed` restores them afterwards, so they end up bit for bit as in a
run without checkpointing.
"""
import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _keep_batchnorm_buffers(module):
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def _recomputation(module, extra_context):
    with _keep_batchnorm_buffers(module), extra_context():
        yield


def checkpointed(module, *args, recompute_context=contextlib.nullcontext):
    """module(*args), its activations recomputed in the backward pass; a plain call when autograd is off
    (evaluation, a momentum encoder under no_grad), where there is nothing to store. `recompute_context()` is
    entered around the recomputation (SparK re-sets its sparse mask there)."""
    if not torch.is_grad_enabled():
        return module(*args)
    if torch.compiler.is_compiling():  # traced as a plain checkpoint; the scripts that compile have no BatchNorm
        return checkpoint(module, *args, use_reentrant=False)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputation(module, recompute_context)))
