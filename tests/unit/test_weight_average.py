"""The moving average of the weights (`ema_decay`): what it tracks, its update rule, swapping it in
for val and checkpoints, and a resume that carries on exactly as an uninterrupted run.
(Through Ray Train and the CLI, with the export: tests/e2e/test_cli_train.py.)"""

from __future__ import annotations

import pytest
import torch

from platescope.training.weight_average import WeightAverage, tracked


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen, as a LoRA run's base
    return model


def _step(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for an optimiser step and a forward: every trainable weight and BN statistic moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tracked(model).values():
            t.add_(torch.randn(t.shape, generator=g))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_it_tracks_what_trains_and_the_floating_buffers_only():
    names = set(tracked(_model()))
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "2.bias"}


def test_each_update_moves_the_average_by_the_ramped_decay():
    model = _model()
    average = WeightAverage(model, 0.9)
    expected = model[0].weight.detach().clone()
    decays = []
    for n in range(100):
        _step(model, n)
        d = min(0.9, (1 + n) / (10 + n))
        decays.append(average.current_decay())
        average.update()
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.9  # a short memory at first (0.9 from n = 80)
    with average.swapped_in():
        torch.testing.assert_close(model[0].weight.detach(), expected)
    assert average.updates == 100


def test_swapping_in_gives_the_average_and_puts_the_training_weights_back_even_on_error():
    model = _model()
    average = WeightAverage(model, 0.5)
    start = _snapshot(model)
    for n in range(5):
        _step(model, n)
        average.update()
    trained = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), average.swapped_in():
        held = _snapshot(model)
        with pytest.raises(RuntimeError, match="swapped"):
            average.update()
        raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    # The average lies between the start and the training weights; frozen and integer tensors are as they were.
    assert not torch.equal(held["0.weight"], trained["0.weight"]) and not torch.equal(held["0.weight"], start["0.weight"])
    assert torch.equal(held["2.weight"], trained["2.weight"])
    assert torch.equal(held["1.num_batches_tracked"], trained["1.num_batches_tracked"])


def test_a_resume_from_a_checkpoint_carries_on_as_the_uninterrupted_run():
    """A checkpoint is taken with the average swapped in: its model holds the average, its train state
    the training weights. Building the model from it and resuming gives, step by step, the same
    training weights and average as a run that never stopped."""
    steady = _model()
    steady_average = WeightAverage(steady, 0.95)
    for n in range(8):
        _step(steady, n)
        steady_average.update()
    with steady_average.swapped_in():
        checkpoint_model, checkpoint_state = _snapshot(steady), steady_average.state()
    assert checkpoint_state["updates"] == 8
    assert all(torch.equal(checkpoint_state["training_weights"][k], steady.state_dict()[k])
               for k in checkpoint_state["training_weights"])

    resumed = _model(seed=1)  # other weights, overwritten by the checkpoint as a resume's build does
    resumed.load_state_dict(checkpoint_model)
    resumed_average = WeightAverage(resumed, 0.95, checkpoint_state)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in steady.state_dict().items())
    for n in range(8, 12):
        for model, average in ((steady, steady_average), (resumed, resumed_average)):
            _step(model, n)
            average.update()
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in steady.state_dict().items())
    with steady_average.swapped_in(), resumed_average.swapped_in():
        assert all(torch.equal(resumed.state_dict()[k], v) for k, v in steady.state_dict().items())


def test_a_checkpoint_of_another_model_is_refused():
    state = WeightAverage(_model(), 0.9).state()
    other = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="do not fit the model"):
        WeightAverage(other, 0.9, state)


def test_on_noisy_steps_the_average_lies_nearer_the_optimum_than_the_last_weights():
    """Why it exists: SGD with a constant step on a noisy quadratic ends jittering round the optimum;
    the average of its last steps sits closer."""
    torch.manual_seed(0)
    target = torch.randn(200)
    w = torch.nn.Parameter(torch.zeros(200))
    holder = torch.nn.Module()
    holder.w = w
    average = WeightAverage(holder, 0.99)
    optimizer = torch.optim.SGD([w], lr=0.1)
    for _ in range(2000):
        optimizer.zero_grad()
        loss = ((w - target) ** 2).sum() / 2 + (torch.randn(200) * w).sum()  # gradient noise of 1 per weight
        loss.backward()
        optimizer.step()
        average.update()
    last = float((w.detach() - target).norm())
    with average.swapped_in():
        averaged = float((w.detach() - target).norm())
    assert averaged < 0.5 * last, (averaged, last)
