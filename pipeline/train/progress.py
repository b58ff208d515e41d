"""A per-epoch progress bar for training: batches done, the loss and images/s, on a terminal only.

A bar full of carriage returns is noise in a log file or a CI transcript, and ``--json`` promises one
object on stdout with nothing else to parse around; so the bar is drawn only when asked for *and* its
stream is a terminal. The trainer owns one bar per epoch, calls ``update`` once per step and ``show_loss``
at its logging interval, when it reads the step values back from the device anyway.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def wants_progress(requested: bool, stream: TextIO | None = None) -> bool:
    """True when progress was ``requested`` and ``stream`` (default: stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return requested and callable(isatty) and bool(isatty())


class EpochProgress:
    """One epoch's bar: ``epoch 3/30  12/26 [00:04<00:05]  loss=5.12  img/s=410``.

    Neither call reads a device value: the loss shown is the last one the trainer read back at a log point.
    The images/s shown is the epoch's mean so far (data loading included), the figure a user can plan with.
    """

    def __init__(
        self,
        *,
        epoch: int,
        epochs: int,
        total: int | None,
        enabled: bool,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self._bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            file=sys.stderr if stream is None else stream,
            disable=not enabled,
            leave=False,
            dynamic_ncols=True,
            mininterval=min_interval,  # redraws at most this often (seconds), however short the steps
        )
        self._start = time.perf_counter()
        self._images = 0
        self._loss: float | None = None

    def show_loss(self, loss: float | None) -> None:
        """The loss to show from now on (the trainer's latest read-back value)."""
        if loss is not None:
            self._loss = loss

    def update(self, *, images: int) -> None:
        """One step of ``images`` images done."""
        self._images += images
        if self._bar.disable:
            return
        elapsed = time.perf_counter() - self._start
        rate = self._images / elapsed if elapsed > 0 else 0.0
        loss = "…" if self._loss is None else f"{self._loss:.4g}"
        self._bar.set_postfix_str(f"loss={loss} img/s={rate:.0f}", refresh=False)
        self._bar.update()

    def close(self) -> None:
        self._bar.close()
