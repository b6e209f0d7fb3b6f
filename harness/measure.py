"""Peak memory during a piece of work: CUDA peak allocated on GPU, peak RSS on CPU."""
from __future__ import annotations

import os
import threading
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager: .peak_bytes after exit. On CPU it samples RSS every `interval` seconds."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
