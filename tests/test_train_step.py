"""util/train_step.py's TrainStep without autocast: non-finite steps are skipped and counted without a loss scale,
fused optimizers step without a host sync, and gradients are freed after every step."""
import pytest
import torch
from torch import nn

from util.train_step import NonFiniteLossError, TrainStep

X = torch.tensor([[1.0, 2.0, -1.0]])


@pytest.mark.parametrize('amp', ['none', 'bf16'])
def test_a_non_finite_step_is_skipped_and_counted_with_no_loss_scale(amp):
    model = nn.Linear(3, 1, bias=False)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu', amp=amp, max_nonfinite=2)
    before = model.weight.detach().clone()
    trainer.backward(model(X).sum() * float('nan'))
    trainer.step()
    assert int(trainer.skipped) == 1 and torch.equal(model.weight, before)
    assert trainer.state_dict() == {'scaler': None, 'num_updates': 1, 'skipped': 1}
    trainer.check()  # one bad step in a row: not yet
    trainer.backward(model(X).sum())  # d/dw = X: SGD moves by exactly lr * X, nothing scaled in between
    trainer.step()
    assert torch.allclose(model.weight, before - 0.1 * X, rtol=0, atol=1e-7) and int(trainer.skipped) == 1
    for _ in range(2):
        trainer.backward(model(X).sum() * float('inf'))
        trainer.step()
    with pytest.raises(NonFiniteLossError, match='non-finite for 2 optimizer steps in a row'):
        trainer.check()


def test_the_step_counters_live_on_the_training_device():
    model = nn.Linear(3, 1, device='meta')
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'meta')
    assert {t.device.type for t in (trainer.skipped, trainer.consecutive, trainer.worst_run, trainer.grad_norm)} == \
        {'meta'}


def test_a_fused_optimizer_steps_without_a_host_sync(monkeypatch):
    model = nn.Linear(3, 1, bias=False)
    trainer = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), 'cpu')
    before = model.weight.detach().clone()

    def no_sync(self):
        raise AssertionError('TrainStep.step read a tensor on the host')
    monkeypatch.setattr(torch.Tensor, 'item', no_sync)
    monkeypatch.setattr(torch.Tensor, '__bool__', no_sync)
    trainer.backward(model(X).sum() * float('nan'))
    trainer.step()  # skipped on the device, through the optimizer's found_inf
    assert torch.equal(model.weight, before)
    trainer.backward(model(X).sum())
    trainer.step()
    assert not torch.equal(model.weight, before)
    monkeypatch.undo()
    assert int(trainer.skipped) == 1


def test_gradients_are_freed_so_a_parameter_without_one_does_not_move():
    """AdamW would decay and push with its momentum a parameter whose gradient were zeroed instead of freed."""
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    params = [*used.parameters(), *unused.parameters()]
    trainer = TrainStep(used, torch.optim.AdamW(params, lr=0.1, weight_decay=0.1), 'cpu')
    trainer.backward((used(X) + unused(X)).sum())
    trainer.step()
    assert all(p.grad is None for p in params)
    after_first = [p.detach().clone() for p in unused.parameters()]
    trainer.backward(used(X).sum())  # `unused` gets no gradient this step
    trainer.step()
    assert all(torch.equal(p, q) for p, q in zip(unused.parameters(), after_first))


def test_the_counters_resume_from_a_checkpoint_and_an_older_one_without_them_starts_at_zero():
    model = nn.Linear(3, 1)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu')
    for loss in (float('nan'), 1.0, 1.0):
        trainer.backward(model(X).sum() * loss)
        trainer.step()
    resumed = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu')
    resumed.load_state_dict(trainer.state_dict())
    assert (resumed.num_updates, int(resumed.skipped)) == (3, 1)
    resumed.load_state_dict({})
    assert (resumed.num_updates, int(resumed.skipped)) == (0, 0)


def test_an_fp16_runs_loss_scale_resumes():
    model = nn.Linear(3, 1)
    trainer = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu', amp='fp16')
    trainer.backward(model(X).sum() * float('inf'))  # an overflow halves the scale
    trainer.step()
    resumed = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 'cpu', amp='fp16')
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale() == 2.0 ** 15
