"""Torch's CPU threads for the small models fit trains in its own process.

A pair classifier or a per-(type, attribute) scorer is a few thousand weights: one matrix product
of a batch takes microseconds, and a second thread only adds the cost of handing work over.
On a machine whose cores are also busy (the Ray workers of the same fit, another job), torch's
threads spin waiting for each other: the synonyms classifier's 10 epochs on WDC-PAVE's 10,857
training pairs took 8.8 s on one thread and 73.5 s on two, measured side by side on this
2-core machine with another process busy (an ad-hoc timing, 7 Dec 2026)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_threads(n: int = 1):
    """Torch's intra-op threads set to `n` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
