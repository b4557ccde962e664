"""Small helpers for `torchrun` runs: one process per device, rank 0 does the talking.

Distributed mode is entered only when the launcher set WORLD_SIZE > 1; otherwise every
helper degrades to the single-process answer, so callers never branch on it themselves.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import CnnCodesError

_MESSAGE_BYTES = 2048


def launched() -> bool:
    """True when a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1 and return this rank's device.

    nccl on GPU (one GPU per process, picked by LOCAL_RANK), gloo on CPU.
    """
    if not launched() or is_distributed():
        return _local_device(device) if is_distributed() else device
    if not dist.is_available():
        raise CnnCodesError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run a single process")
    device = _local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise CnnCodesError(f"cannot join the distributed run ({backend}: {str(e).splitlines()[0]}); "
                            f"launch with torchrun --nproc_per_node N") from e
    return device


def _local_device(device: torch.device) -> torch.device:
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank() >= count:
        raise CnnCodesError(f"process LOCAL_RANK={local_rank()} has no GPU ({count} visible); "
                            f"use --nproc_per_node <= {count} on this machine")
    return torch.device("cuda", local_rank())


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def local_world_size() -> int:
    """Processes of this run on this machine (they share its cores: see `runtime.process_cores`)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size())))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in a single process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def share_error(message: str | None, device: torch.device) -> None:
    """Raise on every rank if rank 0 hit `message` (so no rank waits forever on a dead peer).

    Call on all ranks: rank 0 passes its error or None, the others pass None.
    """
    if is_distributed():
        buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=comm_device(device))
        if is_main() and message:
            data = message.encode()[:_MESSAGE_BYTES]
            buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        raw = bytes(buf.cpu().tolist()).rstrip(b"\0")
        message = raw.decode(errors="replace") or None
    if message:
        raise CnnCodesError(message)


def comm_device(device: torch.device) -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU otherwise."""
    return device if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")


class ShardSampler(Sampler[int]):
    """Rank r gets items r, r + W, r + 2W, ...: disjoint, no padding (for evaluation sums)."""

    def __init__(self, length: int, num_replicas: int | None = None, rank_: int | None = None):
        self.length = length
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable plain data; a no-op in a single process)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others; [obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


class WorkQueue:
    """A counter shared by all ranks (the process group's key-value store): each `take()` returns
    the next unclaimed index, so a rank that finishes early takes more work (robust to unequal
    items and unequal ranks; a plain counter in a single process). `name` keeps queues apart."""

    def __init__(self, name: str):
        self.key, self.local = f"cnncodes/queue/{name}", 0
        # The default group's store: the one torchrun's rendezvous made (private, but stable since torch 1.x).
        self.store = dist.distributed_c10d._get_default_store() if is_distributed() else None

    def take(self) -> int:
        if self.store is None:
            self.local += 1
            return self.local - 1
        return int(self.store.add(self.key, 1)) - 1
