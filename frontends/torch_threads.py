"""torch's intra-op thread count for one block of work, restored after it.

On a 2-vCPU VM torch's thread pool collapses next to any other busy process when it uses every
core (MiniLM distillation: 150-180 s alone, 1140 s beside one other job; BatchNorm inversion of the
digits ResNet: 3.7 s on one thread, 35 s on two, 10 steps), so the long torch loops run on fewer.
"""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def intra_op_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_cores_but_one() -> int:
    """Training's thread count: one core left to everything else (idle, on 2 vCPUs, one thread
    instead of two cost 1.3x on MiniLM, 22-25 s vs 16-20 s for 20 steps, and was faster on the
    digits ResNet, 1.1-1.3 s vs 2.8-4.4 s for 60 steps)."""
    return min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)
