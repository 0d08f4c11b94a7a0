"""SM partitions: one stream per layout partition, on SMs of its own where the driver allows.

A partition with an SM count gets a CUDA green context made through cuda-python's driver API,
and a stream created in it (cuGreenCtxStreamCreate): every kernel launched on that stream, by
torch, cuBLAS or our own kernels, runs only on the green context's SMs. The streams are
wrapped as torch external streams, so the model's ops run on them unchanged.

Why not torch.cuda.green_contexts: each GreenContext.create(num_sms) splits the whole device
anew, so two of them get overlapping SMs, and the SMs granted are not read back. Here the
device is split once, into groups of the driver's granularity (8 SMs on Hopper, read from the
device at run time), and each partition takes its own run of groups, so partitions are disjoint
by construction; a partition's SMs are read back from its green context (cuGreenCtxGetDevResource).
If combining groups is refused, partitions are carved one at a time instead, as FlashInfer does.

Where green contexts are unavailable (no cuda-python, an old driver, too few SMs, or
NANORUN_GREEN_CONTEXTS=0) every partition gets a plain stream and the backend says so once,
with the reason; SM shares then hold only through grid sizes (cuBLAS SM target, attention CTA
budget). A partition that runs only network ops (collectives) always gets a plain stream: NCCL
kernels run on the process group's own stream, ordered after this one, and are bounded by the
communicator's CTA limit, not by a green context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import Layout

GREEN_ENV = "NANORUN_GREEN_CONTEXTS"
logger = logging.getLogger("nanorun")


class GreenContextError(RuntimeError):
    """Green contexts could not be made; the message says why."""


@dataclass(frozen=True)
class PartitionStream:
    """A layout partition's stream and what it may use."""

    name: str
    requested: int | None     # SMs the layout asked for; None: the whole device
    granted: int              # SMs the stream's kernels can run on
    budget: int | None        # SMs GEMMs and attention size their grids for; None: no limit
    stream: torch.cuda.Stream
    context: Any = None       # its CUgreenCtx; None on a plain stream

    @property
    def green(self) -> bool:
        return self.context is not None


@dataclass(frozen=True)
class GreenStream:
    handle: int               # CUstream, as an int
    granted: int
    context: Any              # CUgreenCtx (never destroyed: streams live as long as the process)


def open_partitions(layout: Layout, device: torch.device,
                    ordinary: frozenset[str] = frozenset()) -> tuple[list[PartitionStream], str]:
    """One stream per partition of `layout`, in layout order, and a line saying how they were
    made (green contexts, or plain streams and why)."""
    device_sms = torch.cuda.get_device_properties(device).multi_processor_count
    shares = {p.name: p.sm_count for p in layout.partitions
              if p.sm_count is not None and p.name not in ordinary}
    green: dict[str, GreenStream] = {}
    if not shares:
        how = "plain streams (no partition of the layout has an SM count)"
    else:
        try:
            green = _green_streams(shares, device)
            how = "green contexts"
        except Exception as e:  # any failure leaves the backend working on plain streams
            why = str(e) if isinstance(e, GreenContextError) else f"{type(e).__name__}: {e}"
            how = f"plain streams, because green contexts failed: {why}"
            logger.warning("nanorun CUDA backend: %s", how)
    partitions = []
    for p in layout.partitions:
        if p.name in green:
            g = green[p.name]
            stream = torch.cuda.ExternalStream(g.handle, device=device)
            partitions.append(PartitionStream(p.name, p.sm_count, g.granted, g.granted, stream,
                                              g.context))
        else:
            budget = None if p.name in ordinary else p.sm_count
            partitions.append(PartitionStream(p.name, p.sm_count, device_sms, budget,
                                              torch.cuda.Stream(device)))
    return partitions, how


def _green_streams(shares: dict[str, int], device: torch.device) -> dict[str, GreenStream]:
    if os.environ.get(GREEN_ENV) == "0":
        raise GreenContextError(f"{GREEN_ENV}=0")
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver     # cuda-python before 12.6
        except ImportError:
            raise GreenContextError("cuda-python is not installed (pip install "
                                    "'nanorun[cuda]')") from None
    torch.zeros(1, device=device)   # the primary context must exist before green ones
    streams = green_contexts(driver, device.index or 0, shares)
    _check_event_ordering([torch.cuda.ExternalStream(g.handle, device=device)
                           for g in streams.values()], device)
    return streams


def green_contexts(driver, ordinal: int, shares: dict[str, int]) -> dict[str, GreenStream]:
    """A green context and stream for each {name: SMs}, on disjoint SMs of device `ordinal`.

    `driver` is cuda.bindings.driver (a stand-in in tests). Raises GreenContextError saying why
    when neither way of splitting the device works.
    """
    cu = _Driver(driver)
    cu("cuInit", 0)
    dev = cu("cuDeviceGet", ordinal)
    whole = cu("cuDeviceGetDevResource", dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    step = _granularity(whole.sm)
    errors = []
    for split in (_equal_groups, _carved_one_by_one):
        try:
            descs = split(cu, dev, whole, step, shares)
            return {name: _open(cu, dev, desc) for name, desc in descs.items()}
        except GreenContextError as e:
            errors.append(f"{split.__name__.strip('_')}: {e}")
    raise GreenContextError("; ".join(errors))


def assign_groups(shares: dict[str, int], step: int, groups: int) -> dict[str, range]:
    """Which of `groups` groups of `step` SMs each partition takes: consecutive runs, each
    share rounded up to whole groups. Raises GreenContextError if they do not fit."""
    runs, at = {}, 0
    for name, sms in shares.items():
        n = -(-sms // step)
        runs[name] = range(at, at + n)
        at += n
    if at > groups:
        raise GreenContextError(f"the layout asks for {at} groups of {step} SMs "
                                f"({dict(shares)}) but the device splits into {groups}")
    return runs


def _equal_groups(cu, dev, whole, step: int, shares: dict[str, int]) -> dict[str, Any]:
    """One split of the device into groups of `step` SMs; a partition's descriptor combines
    its groups (the driver accepts several results of one split in one descriptor)."""
    groups, count, _rest = cu("cuDevSmResourceSplitByCount", whole.sm.smCount // step, whole, 0,
                              step)
    runs = assign_groups(shares, step, count)
    return {name: cu("cuDevResourceGenerateDesc", [groups[i] for i in run], len(run))
            for name, run in runs.items()}


def _carved_one_by_one(cu, dev, whole, step: int, shares: dict[str, int]) -> dict[str, Any]:
    """Each partition split off what the previous ones left."""
    descs, resource = {}, whole
    names = list(shares)
    for k, name in enumerate(names):
        sms = -(-shares[name] // step) * step
        groups, count, rest = cu("cuDevSmResourceSplitByCount", 1, resource, 0, sms)
        if count < 1:
            raise GreenContextError(f"no group of {sms} SMs is left for partition {name!r}")
        descs[name] = cu("cuDevResourceGenerateDesc", [groups[0]], 1)
        if k + 1 < len(names):
            # The driver splits a split's output again only through a green context made of it.
            rest_ctx = cu("cuGreenCtxCreate", cu("cuDevResourceGenerateDesc", [rest], 1), dev,
                          cu.module.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
            resource = cu("cuGreenCtxGetDevResource", rest_ctx,
                          cu.module.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    return descs


def _open(cu, dev, desc) -> GreenStream:
    d = cu.module
    ctx = cu("cuGreenCtxCreate", desc, dev, d.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
    stream = cu("cuGreenCtxStreamCreate", ctx, d.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
    granted = cu("cuGreenCtxGetDevResource", ctx, d.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    return GreenStream(int(stream), granted.sm.smCount, ctx)


def _granularity(sm) -> int:
    """SMs per group: the driver's minimum partition and co-scheduling alignment (CUDA 13
    bindings); 8, Hopper's, where the bindings predate those fields."""
    return max(getattr(sm, "minSmPartitionSize", 0), getattr(sm, "smCoscheduledAlignment", 0)) or 8


class _Driver:
    """Calls cuda.bindings.driver functions, which return (CUresult, outputs...), and raises
    GreenContextError naming the call and the error instead of returning a code."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, name: str, *args):
        err, *out = getattr(self.module, name)(*args)
        if int(err) != 0:
            _, text = self.module.cuGetErrorName(err)
            text = text.decode() if isinstance(text, bytes) else text
            raise GreenContextError(f"{name} failed with {text}")
        return out[0] if len(out) == 1 else tuple(out) if out else None


def _check_event_ordering(streams: list[torch.cuda.Stream], device: torch.device) -> None:
    """Chain a small add through every green stream, ordered only by torch events, and check
    the sum: the executor relies on events crossing green contexts."""
    x = torch.zeros(4096, device=device)
    main = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(main)
    for i, stream in enumerate(streams):
        stream.wait_event(event)
        with torch.cuda.stream(stream):
            x.add_(i + 1)
        event = torch.cuda.Event()
        event.record(stream)
    main.wait_event(event)
    want = len(streams) * (len(streams) + 1) // 2
    if not bool((x == want).all()):
        raise GreenContextError(f"events did not order work across green-context streams "
                                f"(got {x.unique().tolist()[:4]}, want {want})")
