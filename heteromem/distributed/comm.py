"""The collectives a sharded wrapped model uses, on torch.distributed process groups.

One `ShardGroup` per wrapped model. Chunk data moves over the data group: the caller's
process group (NCCL for CUDA, gloo for CPU), all-gathering parameter chunks into device slabs
and reduce-scattering gradients into each rank's shard. Small agreements (which chunks hold
gradients, the global gradient norm) go over the data group too, on the device tier. Objects
and CPU tensors (structure checks, checkpoint digests, full-tensor gathers for export) go over
a gloo group of the same ranks, and a flash checkpoint's background thread has a gloo group
of its own: collectives of one group must be issued in the same order on every rank, and a
thread of its own cannot interleave with training's.

Every collective failure (a peer died, raised, or exceeded the process group's timeout)
becomes a `DistributedError` that says what was being done and what to do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from heteromem.errors import DistributedError

# torch 2.14 renamed the tensor collectives (the old names warn); older torch has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_group(process_group: object) -> object | None:
    """The process group to shard over: the one given, else the default group when
    torch.distributed is initialised; None when there is nothing to shard over (a single
    process, or a group of one rank)."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("hm.wrap: process_group is given but torch.distributed is not "
                             "initialised; call torch.distributed.init_process_group() first")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"hm.wrap: process_group must be a torch.distributed.ProcessGroup, "
                            f"got {type(process_group).__name__}")
        group = process_group
    if dist.get_rank(group) < 0:
        raise ValueError("hm.wrap: this process is not a member of process_group; wrap the "
                         "model only on the ranks of the group")
    return group if dist.get_world_size(group) > 1 else None


class ShardGroup:
    """Rank, world size and collectives of one sharded model, with the bytes each moved."""

    def __init__(self, group: object, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.device = device
        if device.type == "cuda" and self.backend != "nccl":
            raise ValueError(f"hm.wrap: device {device} needs a NCCL process group to shard "
                             f"over, got {self.backend}; init_process_group('nccl')")
        if device.type == "cpu" and self.backend != "gloo":
            raise ValueError(f"hm.wrap: device='cpu' needs a gloo process group to shard over, "
                             f"got {self.backend}; init_process_group('gloo')")
        ranks = dist.get_process_group_ranks(group)
        # NOTE: new_group is itself collective over the default group: every rank of the
        # job creates these two, in this order, when it wraps (hm.wrap runs on every rank).
        self.cpu_group = self.group if self.backend == "gloo" else dist.new_group(ranks, backend="gloo")
        self.checkpoint_group = dist.new_group(ranks, backend="gloo")
        self.bytes_sent = 0
        self.bytes_received = 0

    def _count(self, full_bytes: int) -> None:
        # Ring-equivalent traffic of an all-gather or reduce-scatter of `full_bytes`: each rank
        # sends and receives (N-1)/N of it, whatever algorithm the backend picks.
        share = full_bytes * (self.world - 1) // self.world
        self.bytes_sent += share
        self.bytes_received += share

    def _fail(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"heteromem: {what} failed on rank {self.rank} of {self.world}: {exc}. Another rank "
            "probably died, raised, or did not reach this point within the process group's "
            "timeout (init_process_group(timeout=...)). This rank's training state is as it "
            "was after its last completed step; stop every rank and resume all of them from "
            "the last checkpoint")

    # ------------------------------------------------------------------ chunk data

    def all_gather_(self, full: torch.Tensor, lo: int, hi: int, what: str,
                    stream: object = None) -> object:
        """Fills `full` (a chunk's device copy) from every rank's part; this rank's part,
        full[lo:hi], is already in place. On CUDA the gather is ordered after `stream`'s
        work and a CUDA event recorded on `stream` after it is returned; on CPU it is done
        when this returns (None)."""
        self._count(full.numel() * full.element_size())
        try:
            if stream is None:
                _all_gather(full, full[lo:hi], group=self.group)
                return None
            with torch.cuda.stream(stream):
                work = _all_gather(full, full[lo:hi], group=self.group,
                                                   async_op=True)
                work.wait()  # the stream waits for the gather, the CPU does not
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
            return event
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, what: str) -> None:
        """out = this rank's part of the sum of every rank's `full`."""
        self._count(full.numel() * full.element_size())
        try:
            _reduce_scatter(out, full, group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc

    def sum_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """All-reduce (sum) of a small tensor on the device tier, in place."""
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return t

    def any(self, flags: list[bool], what: str) -> list[bool]:
        """Per position: whether it is True on any rank."""
        if not flags:
            return []
        t = torch.tensor(flags, dtype=torch.int32, device=self.device)
        self.sum_(t, what)
        return [bool(v) for v in t.tolist()]

    # ------------------------------------------------------------------ host data and objects

    def gather_host(self, full: torch.Tensor, part: torch.Tensor, what: str,
                    group: object = None) -> None:
        """full (CPU, contiguous) = every rank's `part` (CPU, equal sizes) in rank order."""
        self._count(full.numel() * full.element_size())
        try:
            _all_gather(full, part.contiguous(), group=group or self.cpu_group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc

    def all_gather_object(self, obj: object, what: str, group: object = None) -> list:
        out: list = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=group or self.cpu_group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return out

    def broadcast_object(self, obj: object, what: str, group: object = None) -> object:
        """rank 0's `obj` on every rank."""
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group or self.cpu_group, 0),
                                       group=group or self.cpu_group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return box[0]

    def agree(self, error: str | None, what: str, group: object = None) -> str | None:
        """The first error any rank reports (rank order), so that every rank refuses alike."""
        errors = self.all_gather_object(error, what, group)
        return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)

    def barrier(self, what: str, group: object = None) -> None:
        try:
            dist.barrier(group=group or self.cpu_group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
