"""What several processes (`torchrun`, `accelerate launch`, several GPUs or machines) need
beyond Accelerate: one random stream per rank, small JSON gathered to every rank, and a
lock that keeps a second run out of a live run folder.

Random streams follow DiT (`global_seed * world_size + rank`) and k-diffusion (one seed
per process drawn from the master seed) in spirit, with one twist: every process seeds
`train.seed` before building the networks, so their initial weights agree, and only then
do ranks 1..N-1 move to streams of their own. Rank 0 keeps the stream it was on, so a
single process draws exactly what ldmkit always drew for the same seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmkit.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# ----------------------------------------------------------------------------- random streams


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s stream: `seed` itself for rank 0, else 63 bits hashed
    from (seed, rank), so no rank's stream is another's shifted by a few draws."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"ldmkit-rank-stream:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_random_streams(seed: int, rank: int) -> None:
    """Call on every process once the shared weights are built: ranks > 0 reseed torch
    (CPU and CUDA), NumPy and Python with `rank_seed`; rank 0 carries on unchanged."""
    if rank == 0:
        return
    own = rank_seed(seed, rank)
    torch.manual_seed(own)
    np.random.seed(own % 2**32)
    random.seed(own)


def is_main_process() -> bool:
    """This is the process that reports (rank 0, or the only one), once Accelerate runs."""
    from accelerate import PartialState

    return PartialState().is_main_process


# ----------------------------------------------------------------------------- collectives


def gather_json(accelerator: Any, obj: Any) -> list[Any]:
    """`obj` (anything JSON can hold) from every process, in rank order, on every process.
    Sent as UTF-8 bytes in a tensor: nothing is pickled, even between our own processes."""
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    device, world = accelerator.device, accelerator.num_processes
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded.to(device))
    return [json.loads(bytes(p[:int(s.item())].cpu().numpy())) for p, s in zip(parts, sizes)]


def all_agree(accelerator: Any, ok: bool) -> bool:
    """True on every process when `ok` holds on every process (one small all-reduce)."""
    if accelerator is None or accelerator.num_processes == 1:
        return ok
    import torch.distributed as dist

    failed = torch.tensor([0 if ok else 1], device=accelerator.device)
    dist.all_reduce(failed)
    return int(failed.item()) == 0


# ----------------------------------------------------------------------------- run folder lock


class RunLock:
    """An exclusive `flock` on `<folder>/.lock`, held while a run writes into the folder.
    The kernel drops it when the holder exits, even on SIGKILL, so a crashed run never
    leaves a stale lock behind; the file itself stays and says who held it last."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fh = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: run unlocked
            log.warning("%s: no flock on this system; a second run would not be refused",
                        self.path)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"{self.path}: this run folder is in use by {holder}; wait for "
                            "that run to end or choose another --out") from None
        except OSError as exc:  # a file system without locks (some network mounts)
            fh.close()
            log.warning("%s: cannot lock (%s); a second run would not be refused",
                        self.path, exc)
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file drops the flock
            self._fh = None


@contextmanager
def run_folder_lock(accelerator: Any, folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block (the main process takes it; every process
    learns whether it got it, so none is left waiting at a collective)."""
    lock = RunLock(folder) if accelerator.is_main_process else None
    error: UserError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as exc:
            error = exc
    if not all_agree(accelerator, error is None):
        raise error or UserError(f"{folder}: the main process could not lock this run folder "
                                 "(see its message)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
