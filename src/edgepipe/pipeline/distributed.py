"""Multi-process training under `torchrun` (DDP: gloo on CPU, NCCL on CUDA).

Every rank runs the same recipe. Training stages run on all ranks, each rank taking its share of every
global batch; every other stage, every write, the manifest and the benchmark belong to rank 0. Rank 0
decides whether a stage is reused and hands its record to the others, so all ranks follow one plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, index: Any) -> Any:
        """This rank's part of a global batch of indices."""
        return index[self.rank :: self.size] if self.distributed else index

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def average_gradients(self, params: Any) -> None:
        """All-reduce the gradients of parameters that live outside the DDP-wrapped model."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.size

    def close(self, *, wait: bool) -> None:
        """Leave the process group before the interpreter exits: a rank that exits with the group still
        alive can abort in gloo's threads ("terminate called without an active exception"). `wait` holds
        each rank until all arrive; never wait after an error, the others may be inside another collective."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if wait:
            dist.barrier()
        dist.destroy_process_group()

    def wrap(self, model: Any) -> Any:
        """The model as the training loop should call it: DDP when there are several ranks."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)


def join_world() -> World:
    """Join the process group torchrun describes in the environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), backend=backend)
