"""The host staging pool of ``offload="cpu"``: device buffers in which rows of ``dy^T x`` are formed
while earlier rows are copied (asynchronously on CUDA) to the host accumulators."""

from __future__ import annotations

import torch

__all__ = ["StagingPool"]


class StagingPool:
    """Two device buffers shared by all host accumulators: a layer's rows of ``dy^T x`` are formed
    in one while the other's copy to host memory is in flight (asynchronous on CUDA)."""

    def __init__(self, device: torch.device, elements: int, dtype: torch.dtype) -> None:
        self.device, self.elements, self.dtype = device, max(int(elements), 1), dtype
        self._slots: list[dict] = []
        self._turn = 0

    def slot(self) -> dict:
        """The next slot (the two are allocated on first use), its pending copy added to the host first."""
        if not self._slots:
            pin = self.device.type == "cuda"
            for _ in range(2):
                self._slots.append({
                    "dev": torch.empty(self.elements, dtype=self.dtype, device=self.device),
                    "host": torch.empty(self.elements, dtype=self.dtype, pin_memory=pin),
                    "pending": None,
                })
        slot = self._slots[self._turn]
        self._turn ^= 1
        self.drain(slot)
        return slot

    @staticmethod
    def drain(slot: dict) -> None:
        """Adds a slot's copied rows to their host accumulator once the copy is done."""
        if slot["pending"] is None:
            return
        target, event, n = slot["pending"]
        if event is not None:
            event.synchronize()
        target.add_(slot["host"][:n].view_as(target))
        slot["pending"] = None

    def flush(self) -> None:
        """Adds every pending copy (after each backward: the host accumulators are then complete)."""
        for slot in self._slots:
            self.drain(slot)

    @property
    def nbytes(self) -> int:
        return 2 * self.elements * self.dtype.itemsize if self._slots else 0
