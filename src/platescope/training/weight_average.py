"""An exponential moving average of the weights that train (`ema_decay`): what val scores, what a
checkpoint's model holds and so what the export ships, while the optimiser goes on with its own.

A short, noisy run (small batches, a few thousand steps) ends on weights that zigzag round a good
point; their running average sits nearer it. After each optimiser step every tracked tensor moves
towards the training one: average = d * average + (1 - d) * weight, with d = min(ema_decay,
(1 + n) / (10 + n)) at the n-th update, so the first steps' random weights fade fast instead of
weighing for thousands of steps. Tracked: every parameter that trains (a LoRA run's adapter, not its
frozen base) and every floating buffer (batch-norm statistics move with the weights they belong to).
Under DDP every worker keeps its own average: the parameters are the same on all of them after each
step, so their averages are too; batch-norm statistics differ by the last local batch (DDP sends rank
0's at each forward), so a worker scores its val shard with statistics a hair from rank 0's, which
the checkpoint holds.

A checkpoint holds the averaged weights as its model, so the export and a resumed val need nothing
new, and the training weights with the update count in its train state, so a resume carries on with
both where they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

STATE_KEY = "weight_average"


def tracked(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors averaged, by name: parameters that train, and floating buffers."""
    out = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out.update((name, b) for name, b in model.named_buffers() if b.is_floating_point())
    return out


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, Any] | None = None):
        """Average `model`'s weights from now on. With `saved` (a checkpoint's `state()`), the model
        holds the checkpoint's averaged weights: they become the average, and the training weights
        saved beside them go back into the model."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: {decay} is not between 0 and 1")
        self.decay = decay
        self._live = tracked(model)
        self._average = {name: t.detach().clone() for name, t in self._live.items()}
        self.updates = 0
        self._set_aside: dict[str, torch.Tensor] | None = None
        if saved is not None:
            weights = saved["training_weights"]
            missing = sorted(set(self._live) ^ set(weights))
            if missing:
                raise ValueError(f"the checkpoint's training weights do not fit the model: {missing[:5]}")
            with torch.no_grad():
                for name, t in self._live.items():
                    t.copy_(weights[name])
            self.updates = int(saved["updates"])

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One optimiser step's worth: move the average towards the model's weights."""
        if self._set_aside is not None:
            raise RuntimeError("update while the averaged weights are swapped into the model")
        weight = 1.0 - self.current_decay()
        for name, t in self._live.items():
            self._average[name].lerp_(t.detach(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within: the model holds the averaged weights (val, save); after: its training weights again."""
        with torch.no_grad():
            self._set_aside = {name: t.detach().clone() for name, t in self._live.items()}
            for name, t in self._live.items():
                t.copy_(self._average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in self._live.items():
                    t.copy_(self._set_aside[name])
            self._set_aside = None

    def state(self) -> dict[str, Any]:
        """For a checkpoint's train state: the update count and the training weights (on the CPU),
        also when taken while the average is swapped in, as a checkpoint is."""
        weights = self._live if self._set_aside is None else self._set_aside
        return {"updates": self.updates,
                "training_weights": {name: t.detach().to("cpu", copy=True) for name, t in weights.items()}}
