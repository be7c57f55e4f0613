"""Per-step numbers of the training loop kept on the device and read by the host only at boundaries.

Reading a CUDA tensor (`.item()`, `float(t)`) waits for every kernel queued before it, so a loop that reads its
loss each micro-batch never lets the host run ahead of the GPU. Here each step adds its loss to a device-side
window and records, still on the device, the first step whose loss or gradient norm was not finite; `read()`
copies all of it to the host in one transfer. The loop reads at logging, evaluation and checkpoint boundaries
and at the end, and refuses to write anything after a non-finite step (see loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WHAT = ("loss", "gradient norm")  # what the first non-finite value was, by code


@dataclass(frozen=True)
class Reading:
    window_mean: float | None  # mean step loss since the window last restarted (None: no step since)
    last: float | None  # the last step's loss
    bad_step: int | None  # the first step with a non-finite loss or gradient norm, None if none
    bad_value: float
    bad_what: str


class StepStats:
    def __init__(self, device):
        self.device = torch.device(device)
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self._sum, self._last = z(), z()
        self._n, self._steps = 0, 0
        self._bad_step, self._bad_value, self._bad_what = z(), z(), z()  # bad_step 0: none yet (steps count from 1)

    def add(self, loss: torch.Tensor) -> None:
        """The step's loss (a 0-dim tensor on the device); no host read."""
        loss = loss.detach().to(torch.float64)
        self._sum = self._sum + loss
        self._last = loss
        self._n += 1
        self._steps += 1

    def check(self, step: int, values: torch.Tensor, what: str) -> None:
        """Remember `step` if any of `values` is not finite and no earlier step was; no host read."""
        v = values.detach().reshape(-1).to(torch.float64)
        bad = ~torch.isfinite(v)
        first = bad.any() & (self._bad_step == 0)
        # the first non-finite value (any value when none is); gathered, since indexing by a 0-dim tensor reads it
        value = v.gather(0, bad.to(torch.uint8).argmax().reshape(1)).squeeze(0)
        self._bad_step = torch.where(first, float(step), self._bad_step)
        self._bad_value = torch.where(first, value, self._bad_value)
        self._bad_what = torch.where(first, float(WHAT.index(what)), self._bad_what)

    def read(self) -> Reading:
        """One device-to-host copy of everything; the loss window runs on (see new_window)."""
        s, last, step, value, what = torch.stack([self._sum, self._last, self._bad_step, self._bad_value,
                                                  self._bad_what]).tolist()
        n = self._n
        return Reading(s / n if n else None, last if self._steps else None, int(step) or None, value,
                       WHAT[int(what)])

    def new_window(self) -> None:
        """Restart the loss window: after a log line only, so evaluation and checkpoint reads between two log lines
        do not cut the window the next one averages."""
        self._n, self._sum = 0, torch.zeros_like(self._sum)
