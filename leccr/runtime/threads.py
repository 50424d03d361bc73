"""torch's CPU thread count, fixed while a stage trains.

torch splits a full reduction (a loss's `mean()`, a gradient norm) into one partial sum per thread, so
the same training run on 1 thread and on 2 ends with weights that differ in their last bits, and the
differences grow over the steps (the demo's LECCR: another validation SumR). torch's default is the
machine's core count (or `OMP_NUM_THREADS`), which differs between machines, and between a stage run
alone and one started beside others with fewer threads. So `train.threads` (in the train key) says it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch.set_num_threads(count) inside the block, the previous count after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def numerics(device: str, threads: int) -> dict:
    """What a stage's numbers depend on beyond its key, for its manifest's summary: the torch build, the
    CPU instruction set its kernels chose (AVX2 and AVX-512 kernels round differently), the device
    and the thread count."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device, "threads": threads}
