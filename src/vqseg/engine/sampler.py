"""Infinite, resumable index streams over in-memory slice sets."""

from __future__ import annotations

from typing import Any

import torch


class InfiniteSampler:
    """Batches from successive random permutations; a batch may straddle two permutations, so
    neither stream is ever truncated by the other's epoch length (unlike SSL4MIS's two-stream
    sampler). Its full state is saved so a resumed run draws exactly the same batches."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty set")
        self.size = size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(size, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            if self.pos == self.size:
                self.perm = torch.randperm(self.size, generator=self.generator)
                self.pos = 0
            take = min(need, self.size - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
