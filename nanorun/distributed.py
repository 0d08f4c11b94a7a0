"""Tensor parallelism: the process group a model's collectives run on, and this rank's place.

A model split over N devices runs as N processes, one per device, each an ordinary Engine over
its shard of the weights (models/loader.py cuts them) and of the KV cache (its own KV heads).
The only communication is inside the model: the all-reduce ops of models.llama.TP_LAYER_OPS,
which the planner schedules like any other op. Nothing else is exchanged, so every rank must
make the same decisions by itself:

- every rank gets the same requests in the same order (the same add_request / abort_request
  calls between the same step() calls), so the deterministic scheduler forms the same batches
  and the planner the same plans, and collectives are issued in the same order everywhere;
- every rank sees the same logits (all-reduce gives every rank the same sum, and the embedding,
  final norm and lm_head are replicated), and the samplers are seeded alike, so every rank
  samples the same tokens. Every rank's step() therefore returns the same outputs; by
  convention rank 0 (`is_driver`) is the one that reports them.

Launch with `torchrun --nproc-per-node N ...`: it sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address, and nanorun initialises the default group (gloo on CPU, NCCL on CUDA, each
rank on cuda:LOCAL_RANK). A program that initialised torch.distributed itself, or wants a
subgroup, passes its group instead.

NCCL's kernels run on the communicator's own stream, not on a green context, so the group
nanorun creates bounds how many CTAs (SMs) a collective may occupy: NCCL_MAX_CTAS, 8 unless
$NANORUN_NCCL_MAX_CTAS says otherwise (the "net" partition of the overlap layout is 8 SMs).
An all-reduce overlapping GEMMs of the other nano-batch then takes a bounded slice of the SMs
instead of as many channels as NCCL would pick for a lone collective.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NCCL_MAX_CTAS = 8


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size` tensor-parallel ranks, on `device`. `group` is None
    when size == 1; `owns_group` when nanorun initialised it (and so shuts it down)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None
    device: torch.device
    owns_group: bool = False

    @property
    def is_driver(self) -> bool:
        """Whether this rank reports results (rank 0); all ranks compute the same ones."""
        return self.rank == 0

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (a collective: all ranks must call it)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def on_driver(self, decide):
        """decide() run on rank 0 only, its result (or its exception) on every rank: a
        collective, all ranks must call it. For what ranks must not decide apart, such as a
        choice made from files that may differ, or be missing, on another host."""
        if self.group is None:
            return decide()
        box = [None]
        if self.is_driver:
            try:
                box = [(True, decide())]
            except Exception as e:     # every rank raises it, so none waits in a collective
                box = [(False, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0),
                                   group=self.group, device=self.device)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def shutdown(self) -> None:
        """Destroy the default process group if nanorun created it; idempotent."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def setup_tensor_parallel(size: int, device: torch.device,
                          group: dist.ProcessGroup | None = None) -> TensorParallel:
    """The tensor-parallel context of this process for `size` ranks: `group` if given, else the
    default group if torch.distributed is initialised, else one initialised from torchrun's
    environment. size == 1 without a group needs no torch.distributed at all."""
    if group is None and size == 1:
        return TensorParallel(0, 1, None, device)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; tensor parallelism needs "
                           "it (use tensor_parallel_size=1)")
    if group is not None:
        return _from_group(size, device, group, owns=False)
    if dist.is_initialized():
        return _from_group(size, device, dist.group.WORLD, owns=False)
    return _from_group(size, *_init_from_launcher(size, device), owns=True)


def _init_from_launcher(size: int, device: torch.device) -> tuple[torch.device, dist.ProcessGroup]:
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} processes, one per device, but this one "
            f"was not started by a launcher ({', '.join(missing)} unset): launch with "
            f"`torchrun --nproc-per-node {size} your_script.py` (or `torchrun --nproc-per-node "
            f"{size} -m nanorun.cli generate --tp {size}`), or initialise torch.distributed "
            f"yourself and pass process_group=")
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started {world} processes; "
                         f"launch with --nproc-per-node {size}")
    device = _rank_device(device, int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Read by NCCL (>= 2.17) when the communicator is created; a user's own setting wins.
        os.environ.setdefault("NCCL_MAX_CTAS", str(nccl_max_ctas()))
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world)
    return device, dist.group.WORLD


def nccl_max_ctas() -> int:
    """CTAs a collective of the group nanorun creates may use ($NANORUN_NCCL_MAX_CTAS)."""
    value = os.environ.get("NANORUN_NCCL_MAX_CTAS", str(NCCL_MAX_CTAS))
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"NANORUN_NCCL_MAX_CTAS must be an integer from 1 to 64 (NCCL's "
                         f"limit), got {value!r}")
    return int(value)


def _from_group(size: int, device: torch.device, group: dist.ProcessGroup, *,
                owns: bool) -> TensorParallel:
    ranks = dist.get_world_size(group)
    if ranks != size:
        raise ValueError(f"tensor_parallel_size={size} but the process group has {ranks} "
                         f"ranks; make them equal (pass a subgroup of {size} ranks as "
                         f"process_group=)")
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        raise ValueError("a NCCL process group cannot reduce CPU tensors: use device='cuda', "
                         "or a gloo group on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank(group)))
    return TensorParallel(dist.get_rank(group), size, group, _rank_device(device, local_rank),
                          owns)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """cuda without an index means this rank's own GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device
