"""Process groups of one replica: tensor-parallel groups inside each pipeline stage, point-to-point between stages.

Rank r is TP rank r % tp of stage r // tp. Size 1 everywhere means no communication at all (one process)."""
from __future__ import annotations

import collections
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.kernels.reduce_site import ReduceSite

logger = logging.getLogger("strata")
# Inputs up to this size are all-reduced one-shot through symmetric memory: every rank reads its peers' copies
# over NVLink and sums them, in one kernel. On two H200s (benchmarks/allreduce.py, inside a CUDA graph) that takes
# 7 us for a decode step's [1, 4096] bf16 against NCCL's 20 us, and 20 us against 38 us at 2 MiB.
ONE_SHOT_MAX_BYTES = 2 << 20


class DistributedInitError(RuntimeError):
    """Some ranks did not join the process group in time; `missing` lists them."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1
    same_node: bool = True  # every rank of the group runs on one node
    expert_parallel: bool = False  # MoE layers place whole experts on the ranks (engine/layers/moe.py)
    _one_shot_buffer: torch.Tensor | None = None
    # The batch-1 decode's all-reduces folded into its gemvs (engine/kernels/reduce_site.py), in step order
    reduce_sites: list[ReduceSite] = field(default_factory=list)

    def enable_one_shot_all_reduce(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Small all-reduces (decode steps) through a symmetric-memory buffer instead of NCCL. Collective: every
        rank of the group calls it, before any CUDA graph is captured. False where it cannot be used."""
        if self.size == 1 or device.type != "cuda" or not self.same_node:
            return False
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, self.group.group_name)
            torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 - raises where this torch build lacks it
        except Exception as e:  # noqa: BLE001 - NCCL still works
            logger.warning("one-shot all-reduce unavailable, using NCCL for every all-reduce: %s", e)
            return False
        self._one_shot_buffer = buffer
        return True

    def enable_reduce_sites(self, num_sites: int, width: int, dtype: torch.dtype, device: torch.device) -> bool:
        """`num_sites` all-reduces of one [1, width] row each, through symmetric memory the gemvs push to and read
        (a batch-1 decode step's o/down projections). Collective, like enable_one_shot_all_reduce, and only where
        that one is enabled (same node, CUDA). A site's count is reset by the reader of the next one, so a step
        needs at least three."""
        if self._one_shot_buffer is None or num_sites < 3:
            return False
        import torch.distributed._symmetric_memory as symm_mem

        parts = symm_mem.empty(num_sites, self.size, width, dtype=dtype, device=device)
        counters = symm_mem.empty(2, num_sites, dtype=torch.int32, device=device)  # counts, tickets
        counters.zero_()
        torch.cuda.synchronize(device)
        peer_parts = _peer_addresses(parts, symm_mem.rendezvous(parts, self.group.group_name), self.rank)
        peer_counts = _peer_addresses(counters, symm_mem.rendezvous(counters, self.group.group_name), self.rank)
        row_bytes, count_bytes = parts[0].nbytes, counters.element_size()
        self.reduce_sites = [
            ReduceSite(parts[s], counters[0, s:s + 1], counters[1, s:s + 1],
                       (peer_parts + s * row_bytes).to(device), (peer_counts + s * count_bytes).to(device),
                       counters[0, s - 1:s] if s else counters[0, -1:], self.rank)
            for s in range(num_sites)]
        return True

    def staging(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """Where a partial sum of this shape can be written for all_reduce to take it without a copy (the one-shot
        path's symmetric buffer); None where all_reduce would not take that path."""
        buffer, numel = self._one_shot_buffer, math.prod(shape)
        if buffer is None or numel > buffer.numel() or dtype != buffer.dtype:
            return None
        return buffer[:numel].view(shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        staged = self.staging(x.shape, x.dtype) if x.is_contiguous() else None
        if staged is None:
            torch.distributed.all_reduce(x, group=self.group)
            return x
        out = x
        if staged.data_ptr() == x.data_ptr():  # the caller wrote its partial sum into staging()
            out = torch.empty_like(x)
        else:
            staged.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group.group_name, out)
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dimension."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass
class PPStage:
    """This rank's pipeline stage; hidden states and residuals go to the same TP rank of the next stage, and the
    last stage's sampled tokens back to the same TP rank of the first (for the steps scheduled ahead)."""

    index: int = 0
    size: int = 1
    rank: int = 0  # global rank
    tp_size: int = 1
    # This TP rank's first and last stage. Its own communicator (NCCL stream): on the one that carries hidden
    # states, a receive of tokens would hold back every later send of hidden states until the tokens came.
    token_group: Any = None
    _sends: list = field(default_factory=list)
    _token_sends: collections.deque = field(default_factory=collections.deque)
    _token_recvs: collections.deque = field(default_factory=collections.deque)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        # Asynchronous, so this stage can start its next batch; the previous send is finished first so that at
        # most one buffer per stage is in flight.
        for work in self._sends:
            work.wait()
        # the torch path's residual stream is float32: it crosses in the model's dtype
        self._sends = [dist.isend(torch.stack([hidden, residual.to(hidden.dtype)]), self.rank + self.tp_size)]

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        buf = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(buf, self.rank - self.tp_size)
        return buf[0], buf[1]

    def send_tokens(self, tokens: torch.Tensor) -> None:
        """Last stage: a step's sampled tokens to the first stage, without waiting for them to arrive."""
        self._token_sends.append(dist.isend(tokens, self._token_peer, group=self.token_group))
        while len(self._token_sends) > 2 * self.size:  # long received; keeps the buffers alive until then
            self._token_sends.popleft().wait()

    def recv_tokens(self, num_tokens: int, device: torch.device) -> DeviceTokens:
        """First stage: the tokens the last stage samples for a step this stage has just launched."""
        buf = torch.empty(num_tokens, dtype=torch.long, device=device)
        tokens = DeviceTokens(buf, dist.irecv(buf, self._token_peer, group=self.token_group))
        # Each receive is waited for, not just dropped, even when no later step reads it (its placeholders were
        # known by then). Over gloo a receive dropped before its message came takes that message into freed memory
        # and the next receives get nothing: the first stage then waited forever for tokens (on a busy 2-core
        # host). At most size + 1 steps are in flight, so an older receive's step has reached the driver, and its
        # tokens were sent: waiting for it is short.
        self._token_recvs.append(tokens)
        while len(self._token_recvs) > self.size + 1:
            self._token_recvs.popleft().get()
        return tokens

    @property
    def _token_peer(self) -> int:
        """The same TP rank of the last stage (from the first) or of the first (from the last)."""
        hops = (self.size - 1) * self.tp_size
        return self.rank + hops if self.is_first else self.rank - hops


@dataclass(eq=False)  # compared and hashed by identity: one per step
class DeviceTokens:
    """A step's sampled tokens on this device: the sampler's output, or on a first pipeline stage a receive from
    the last stage that the device (NCCL) or host (gloo) waits for only when a later step reads them."""

    tensor: torch.Tensor
    work: Any = None

    def get(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


def _peer_addresses(tensor: torch.Tensor, handle, rank: int) -> torch.Tensor:
    """int64 [world] (host): where `tensor` starts in each rank's mapping of the symmetric allocation."""
    offset = tensor.data_ptr() - handle.buffer_ptrs[rank]
    return torch.tensor([ptr + offset for ptr in handle.buffer_ptrs], dtype=torch.int64)


def balanced_layer_split(hf_config, pp: int) -> list[int]:
    """Layers per stage so that each stage reads about as many weights per step: the last stage also holds the
    LM head (Llama-3-8B: 2.4 layers' worth, so two stages take 17 and 15), the others share the rest evenly."""
    h, n = hf_config.hidden_size, hf_config.num_hidden_layers
    d = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 1
    inter = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size  # per expert
    layer = 2 * h * hf_config.num_attention_heads * d + 2 * h * kv * d + 3 * h * inter * experts
    head = hf_config.vocab_size * h / layer
    if pp == 1:
        return [n]
    last = min(max(1, round((n + head) / pp - head)), n - (pp - 1))
    return _even_split(n - last, pp - 1) + [last]


def _even_split(n: int, parts: int) -> list[int]:
    """n split into `parts` counts, the first ones taking the remainder."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def layer_ranges(num_layers: int, pp: int, split: list[int] | None = None) -> list[tuple[int, int]]:
    """Each stage's [start, end) layers: `split` gives the count per stage; by default even, the first stages
    taking the remainder."""
    if split is None:
        split = _even_split(num_layers, pp)
    if len(split) != pp or sum(split) != num_layers or min(split) < 1:
        raise ValueError(f"pipeline_layer_split {split} must give each of the {pp} stages at least one layer "
                         f"and sum to the model's {num_layers} layers")
    starts = [sum(split[:i]) for i in range(pp)]
    return [(s, s + n) for s, n in zip(starts, split)]


def interface_for(ip: str) -> str | None:
    """The network interface that owns `ip`, so gloo/NCCL bind to it rather than whatever the hostname gives."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


def open_store(world: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port (read it from `.port`)."""
    return dist.TCPStore("0.0.0.0", 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def init_distributed(rank: int, world: int, tp: int, addr: str, port: int, timeout_s: float, device: torch.device,
                     node_ip: str, store: dist.TCPStore | None = None) -> tuple[TPGroup, PPStage]:
    """Join the replica's process group through rank 0's store at addr:port, then build the TP group of this
    rank's stage. Raises DistributedInitError naming the ranks that did not join within `timeout_s`, which is
    also the timeout of every collective afterwards."""
    timeout = timedelta(seconds=timeout_s)
    iface = interface_for(node_ip)
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME" if device.type == "cpu" else "NCCL_SOCKET_IFNAME", iface)
    if store is None:
        try:
            store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
        except dist.DistError as e:
            # This rank is the one that did not join (rank 0's store is up: the driver opened it first).
            raise DistributedInitError(f"rank {rank} could not reach rank 0's store at {addr}:{port}: {e}", [rank])
    keys = [f"strata/joined/{r}" for r in range(world)]
    store.set(keys[rank], node_ip)
    try:
        store.wait(keys, timeout)
    except dist.DistError:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise DistributedInitError(f"ranks {missing} did not join within {timeout_s:g} s", missing)
    node_ips = [store.get(k).decode() for k in keys]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    pp = world // tp
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None for s in range(pp)]
    token_groups = [dist.new_group([r, (pp - 1) * tp + r]) if pp > 1 else None for r in range(tp)]
    stage = rank // tp
    same_node = len(set(node_ips[stage * tp:(stage + 1) * tp])) == 1
    return (TPGroup(rank % tp, tp, groups[stage], same_node),
            PPStage(stage, pp, rank, tp, token_groups[rank % tp] if stage in (0, pp - 1) else None))
