"""Data-parallel processes on Accelerate: who is main, and the three collectives training uses.

`torchrun` / `accelerate launch` start the processes; Accelerate's `PartialState` joins them
(NCCL on GPUs, gloo on CPUs) and its `reduce`, `gather_object` and `broadcast_object_list` do
the talking. One plainly launched process is rank 0 of 1 and talks to nobody.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from ..errors import SoftpromptError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


@dataclass
class Processes:
    """This process's place among data-parallel processes; one process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    """This process's device; None with one process (then --device or the first available)."""
    fsdp: bool = False
    """The base model is sharded over the processes (only with more than one)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the processes, in place; returns it."""
        if self.world > 1:
            from accelerate.utils import reduce

            t.copy_(reduce(t, reduction="sum"))
        return t

    def gather(self, items: list) -> list:
        """Every process's items, concatenated in rank order."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def from_main(self, fn):
        """Run fn in the main process only; every process gets its result (or its error)."""
        if self.world == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [None, None]
        if self.main:
            try:
                box = [fn(), None]
            except SoftpromptError as e:
                box = [None, str(e)]
        broadcast_object_list(box, from_process=0)
        if box[1] is not None:
            raise SoftpromptError(box[1])
        return box[0]


def start_processes(device: str | None, fsdp: bool = False) -> Processes:
    """Join the processes that `torchrun` / `accelerate launch` started; one process when launched
    plainly. FSDP is used with `fsdp` or when `accelerate launch` runs an FSDP config."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    fsdp = fsdp or _env_true("ACCELERATE_USE_FSDP")
    cpu = device == "cpu" or not torch.cuda.is_available() or _env_true("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)
    dev = torch.device("cpu") if state.device.type == "cpu" else state.device
    return Processes(rank=state.process_index, world=state.num_processes, device=dev, fsdp=fsdp)


def end_processes(ok: bool = True) -> None:
    """Leave the process group, if this process joined one (call once, at exit; `ok` when
    every process got here without an error, so they can wait for each other first).

    A sharded model is a reference cycle that holds the last collectives' work objects; left to
    the interpreter's own exit, gloo frees them after Python is gone and the process aborts
    ("terminate called without an active exception"). So collect it while Python still runs,
    wait until every process is done talking, then leave."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    if ok:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    torch.distributed.destroy_process_group()
