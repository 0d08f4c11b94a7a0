"""KV connectors: how a prefill engine's KV cache reaches a decode engine (Splitwise).

The engines never touch a transport. A prefill engine's kv_send op (models.llama.KV_SEND)
calls save_kv_layer for the rows of one layer as soon as kv_append wrote them, so a layer's
transfer overlaps the next layers' compute; when the request's prompt is done the engine calls
request_finished with what the decode side needs to continue it (a Handoff), then
wait_for_save, and frees its pages once that returns. The decode side calls start_load_kv to
learn which requests have arrived whole, and wait_for_layer_load to take each layer's KV,
which it places into its own pages (KVCache.place).

The interface is shaped like vLLM's KVConnectorBase_V1 (start_load_kv / wait_for_layer_load /
save_kv_layer / wait_for_save / request_finished), keyed by request id and layer index instead
of vLLM's forward context, so a serving stack can put NIXL or Mooncake behind it without
touching the engine. Two implementations:

  TorchDistributedConnector  torch.distributed point-to-point (isend / recv) between two ranks:
                             gloo on the CPU, NCCL on a GPU.
  InProcessConnector         a queue between two engines of one process (tests, and a
                             "mixed" machine that runs both roles).

Both consumers stage what arrives outside the page pool until the decode engine takes it, so
a decode engine short of pages leaves a request waiting there; nothing is dropped.
"""

from __future__ import annotations

import abc
import pickle
import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .outputs import Logprob
from .sampling_params import SamplingParams

# How long a consumer waits for a message before it says the producer is gone.
RECV_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Handoff:
    """What a decode engine needs to continue a request as if it had prefilled it: its tokens,
    its sampling state (the sampler's key: the next draw is uniform(key, len(output_token_ids)),
    the same on any engine) and what its outputs report so far. The KV of positions
    [0, num_kv_tokens) of every layer travels separately, layer by layer, before it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    sampling_key: int
    eos_token_ids: tuple[int, ...]
    num_kv_tokens: int
    arrival_time: float
    first_token_time: float | None = None
    logprobs: tuple[dict[int, Logprob], ...] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: tuple[dict[int, Logprob] | None, ...] | None = None


class KVConnector(abc.ABC):
    """One end of a KV link between a producer (prefill) and a consumer (decode) engine.

    Producer side:
      save_kv_layer(request_id, layer, start, k, v)  start sending positions [start, start + n)
          of one layer, k and v [n, num_kv_heads, head_dim]; returns at once. A recomputed
          prompt may send positions again: the later copy wins.
      request_finished(handoff)  every layer of the request was saved: send its state.
      wait_for_save()  block until everything sent so far has left (its pages may be freed).
      close()  no more requests will come.
    Consumer side:
      start_load_kv(wait=False) -> [Handoff]  the requests that have arrived whole since the
          last call (with wait, blocks until one has, or the producer closed).
      wait_for_layer_load(request_id, layer) -> (k, v)  one layer's KV of positions
          [0, handoff.num_kv_tokens), taken out of the staging area.
      closed  the producer closed and every arrived request was taken.
    """

    @abc.abstractmethod
    def save_kv_layer(self, request_id: str, layer: int, start: int, k: torch.Tensor,
                      v: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def request_finished(self, handoff: Handoff) -> None: ...

    @abc.abstractmethod
    def wait_for_save(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def start_load_kv(self, wait: bool = False) -> list[Handoff]:
        return self._staging.take_ready(wait)

    def wait_for_layer_load(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._staging.take_layer(request_id, layer)

    @property
    def closed(self) -> bool:
        return self._staging.closed

    @property
    def _staging(self) -> _Staging:
        raise TypeError(f"{type(self).__name__} is a producer only: it receives nothing")


# -- staging on the consumer side: messages in, whole requests out --------------------------------
_KV, _FINISHED, _CLOSE, _ERROR = 0, 1, 2, 3


@dataclass
class _Arriving:
    """One request's KV so far: per layer, the pieces (start, k, v) in arrival order."""

    layers: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    handoff: Handoff | None = None


class _Staging:
    """Collects messages (from `inbox`, filled by a transport) into requests. The consumer's
    thread alone touches the dictionaries; the inbox is the only thing shared."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.inbox: queue.Queue = queue.Queue()
        self.arriving: dict[str, _Arriving] = {}
        self.ready: list[Handoff] = []
        self.closed_by_producer = False

    @property
    def closed(self) -> bool:
        self._drain(block=False)
        return self.closed_by_producer and not self.ready

    def take_ready(self, wait: bool) -> list[Handoff]:
        self._drain(block=False)
        while wait and not self.ready and not self.closed_by_producer:
            self._drain(block=True)
        ready, self.ready = self.ready, []
        return ready

    def take_layer(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        arriving = self.arriving.get(request_id)
        while arriving is None or arriving.handoff is None:   # the handoff follows its KV
            if self.closed_by_producer:
                raise KeyError(f"no KV of request {request_id!r} is staged")
            self._drain(block=True)
            arriving = self.arriving.get(request_id)
        pieces = arriving.layers.pop(layer, None)
        if pieces is None:
            raise KeyError(f"layer {layer} of request {request_id!r} was taken already")
        if not arriving.layers:
            del self.arriving[request_id]
        return _assemble(pieces, arriving.handoff.num_kv_tokens, request_id, layer)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                message = self.inbox.get(timeout=RECV_TIMEOUT_S) if block else \
                    self.inbox.get_nowait()
            except queue.Empty:
                if block:
                    raise TimeoutError(f"no KV message arrived in {RECV_TIMEOUT_S:.0f} s: is "
                                       f"the prefill engine still running?") from None
                return
            block = False
            self._take(message)

    def _take(self, message) -> None:
        kind = message[0]
        if kind == _KV:
            _, request_id, layer, start, k, v = message
            arriving = self.arriving.setdefault(request_id, _Arriving())
            arriving.layers.setdefault(layer, []).append((start, k, v))
        elif kind == _FINISHED:
            handoff: Handoff = message[1]
            arriving = self.arriving.setdefault(handoff.request_id, _Arriving())
            missing = [i for i in range(self.num_layers) if i not in arriving.layers]
            if missing:
                raise RuntimeError(f"request {handoff.request_id!r} was handed off without the "
                                   f"KV of layers {missing}: the prefill engine must run the "
                                   f"kv_send ops (role='prefill')")
            arriving.handoff = handoff
            self.ready.append(handoff)
        elif kind == _ERROR:
            raise RuntimeError(f"the KV link failed: {message[1]!r}") from message[1]
        else:
            self.closed_by_producer = True


def _assemble(pieces, n: int, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [n, H, D] from the pieces of one layer, later pieces over earlier ones."""
    _, k0, _ = pieces[0]
    k = k0.new_empty((n, *k0.shape[1:]))
    v = k0.new_empty((n, *k0.shape[1:]))
    covered = torch.zeros(n, dtype=torch.bool)
    for start, pk, pv in pieces:
        end = min(n, start + pk.shape[0])
        k[start:end], v[start:end] = pk[: end - start], pv[: end - start]
        covered[start:end] = True
    if not bool(covered.all()):
        gap = int((~covered).nonzero()[0])
        raise RuntimeError(f"the KV of request {request_id!r}, layer {layer}, lacks position "
                           f"{gap} of {n}")
    return k, v


# -- in one process ------------------------------------------------------------------------------
class InProcessConnector(KVConnector):
    """Both ends in one process: pair() gives a producer and the consumer it feeds. A save
    copies the rows at once (the producer's pages may be reused after wait_for_save), so
    wait_for_save has nothing to wait for."""

    def __init__(self, staging: _Staging) -> None:
        self._inbox = staging.inbox
        self._consumer_staging = staging

    @classmethod
    def pair(cls, num_layers: int) -> tuple[InProcessConnector, InProcessConnector]:
        """(producer, consumer) of one link for a model of num_layers layers."""
        staging = _Staging(num_layers)
        return cls(staging), cls(staging)

    @property
    def _staging(self) -> _Staging:
        return self._consumer_staging

    def save_kv_layer(self, request_id, layer, start, k, v) -> None:
        self._inbox.put((_KV, request_id, layer, start, k.clone(), v.clone()))

    def request_finished(self, handoff: Handoff) -> None:
        self._inbox.put((_FINISHED, handoff))

    def wait_for_save(self) -> None:
        pass

    def close(self) -> None:
        self._inbox.put((_CLOSE,))


# -- torch.distributed point-to-point --------------------------------------------------------------
class TorchDistributedConnector(KVConnector):
    """One end of a link between two ranks of a torch.distributed group: the producer rank
    isends, the consumer rank runs a thread that receives into its staging area.

    On the wire every message is a header (int64 [kind, layer, start, rows, name bytes]), the
    request id or the pickled Handoff as bytes, then for KV the rows as one [2, rows, H, D]
    tensor of the cache's dtype. Messages of one pair of ranks arrive in the order they were
    sent, so a request's handoff comes after all its KV. A GPU group (NCCL) sends from the
    device the KV lives on; gloo from host memory.

    role: "producer" or "consumer"; peer: the other rank; device: where the KV cache lives.
    The consumer also needs the cache's num_layers, kv_shape (num_kv_heads, head_dim) and dtype,
    to check arrivals and size its receive buffers.
    """

    def __init__(self, *, role: str, peer: int, device: torch.device, group=None, tag: int = 0,
                 num_layers: int | None = None, kv_shape: tuple[int, int] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if role not in ("producer", "consumer"):
            raise ValueError(f"role must be 'producer' or 'consumer', got {role!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedConnector needs torch.distributed initialised "
                               "(launch with torchrun --nproc-per-node 2 and call "
                               "torch.distributed.init_process_group)")
        self.role, self.peer, self.group, self.tag = role, peer, group, tag
        nccl = dist.get_backend(group) == "nccl"
        self.wire = torch.device(device) if nccl else torch.device("cpu")
        self._pending: list = []                  # (work, tensor) of isends not yet waited
        self._consumer_staging: _Staging | None = None
        if role == "consumer":
            if num_layers is None or kv_shape is None or dtype is None:
                raise ValueError("the consumer end needs num_layers, kv_shape and dtype of the "
                                 "KV cache it receives into")
            self.kv_shape, self.dtype = tuple(kv_shape), dtype
            self._consumer_staging = _Staging(num_layers)
            self._thread = threading.Thread(target=self._receive, name="nanorun-kv-recv",
                                            daemon=True)
            self._thread.start()

    @property
    def _staging(self) -> _Staging:
        if self._consumer_staging is None:
            return super()._staging
        return self._consumer_staging

    # -- producer ---------------------------------------------------------------------------
    def save_kv_layer(self, request_id, layer, start, k, v) -> None:
        rows = torch.stack([k, v]).to(self.wire)       # a copy: the pages may change after
        self._send(_KV, layer, start, rows.shape[1], request_id.encode(), rows)

    def request_finished(self, handoff: Handoff) -> None:
        self._send(_FINISHED, 0, 0, 0, pickle.dumps(handoff))

    def wait_for_save(self) -> None:
        pending, self._pending = self._pending, []
        for work, _ in pending:
            work.wait()

    def close(self) -> None:
        if self.role == "producer":
            self._send(_CLOSE, 0, 0, 0, b"")
            self.wait_for_save()
        else:
            self._thread.join(timeout=RECV_TIMEOUT_S)

    def _send(self, kind: int, layer: int, start: int, rows: int, blob: bytes,
              payload: torch.Tensor | None = None) -> None:
        self._check_role("producer")
        header = torch.tensor([kind, layer, start, rows, len(blob)], dtype=torch.int64,
                              device=self.wire)
        tensors = [header]
        if blob:
            tensors.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.wire))
        if payload is not None:
            tensors.append(payload.contiguous())
        for t in tensors:       # kept alive until the send completed
            self._pending.append((dist.isend(t, self.peer, group=self.group, tag=self.tag), t))

    # -- consumer -----------------------------------------------------------------------------
    def _receive(self) -> None:
        """The receiving thread: one message after the other into the staging inbox, until
        the producer closes. An error is passed on, so the consumer raises it."""
        inbox = self._consumer_staging.inbox
        try:
            while True:
                kind, layer, start, rows, size = self._recv(
                    torch.empty(5, dtype=torch.int64, device=self.wire)).tolist()
                blob = bytes(self._recv(torch.empty(size, dtype=torch.uint8,
                                                    device=self.wire)).cpu().numpy()) \
                    if size else b""
                if kind == _KV:
                    kv = self._recv(torch.empty((2, rows, *self.kv_shape), dtype=self.dtype,
                                                device=self.wire))
                    inbox.put((_KV, blob.decode(), layer, start, kv[0], kv[1]))
                elif kind == _FINISHED:
                    inbox.put((_FINISHED, pickle.loads(blob)))
                else:
                    inbox.put((_CLOSE,))
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            inbox.put((_ERROR, e))

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        dist.recv(t, self.peer, group=self.group, tag=self.tag)
        return t

    def _check_role(self, role: str) -> None:
        if self.role != role:
            raise RuntimeError(f"this end of the KV link is the {self.role}; only the "
                               f"{role} may do that")

