"""GPU generator states in checkpoints: each process stores and restores its own device's, so a resume on
fewer visible GPUs works (torch.cuda is mocked: these run on CPUs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clusterssl.pipeline.train.checkpoint import restore_rng_state, rng_state


class FakeCuda:
    """A machine with ``count`` GPUs, this process on GPU ``current``; records the states set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, current: int) -> None:
        self.count, self.current = count, current
        self.set: dict[int, torch.Tensor] = {}
        for name, value in {
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "device_count": lambda: self.count,
            "current_device": lambda: self.current,
            "get_rng_state": self.get,
            "get_rng_state_all": lambda: [self.get(i) for i in range(self.count)],
            "set_rng_state": self.put,
            "set_rng_state_all": lambda states: [self.put(s, i) for i, s in enumerate(states)],
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def _index(self, device: Any) -> int:
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        if index is None:
            index = self.current
        if index >= self.count:
            raise IndexError(f"no GPU {index} on a machine with {self.count}")
        return index

    def get(self, device: Any = "cuda") -> torch.Tensor:
        return torch.full((4,), self._index(device), dtype=torch.uint8)

    def put(self, state: torch.Tensor, device: Any = "cuda") -> None:
        self.set[self._index(device)] = state


def test_a_rank_stores_its_own_device_and_restores_it_on_a_one_gpu_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeCuda(monkeypatch, count=8, current=3)  # rank 3 of an 8-GPU node
    saved = rng_state()
    assert "cuda" not in saved and int(saved["cuda_device"][0]) == 3
    one_gpu = FakeCuda(monkeypatch, count=1, current=0)  # resumed as a Slurm task that sees one GPU
    restore_rng_state(saved)
    assert list(one_gpu.set) == [0] and int(one_gpu.set[0][0]) == 3


def test_old_checkpoints_with_every_visible_gpu_restore_on_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"torch": torch.get_rng_state(), "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    one_gpu = FakeCuda(monkeypatch, count=1, current=0)
    restore_rng_state(old)  # restoring all 8 raised IndexError here
    assert list(one_gpu.set) == [0] and int(one_gpu.set[0][0]) == 0
    two_gpus = FakeCuda(monkeypatch, count=2, current=1)
    restore_rng_state(old)
    assert list(two_gpus.set) == [1] and int(two_gpus.set[1][0]) == 1
