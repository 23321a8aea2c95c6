"""Data-parallel calibration with torch.distributed (torchrun; gloo on CPU, nccl on GPU).

Statistics are sums over tokens, so each rank runs the layer on its contiguous shard of the
calibration sequences, the sums are all-reduced, the refit sample rows are all-gathered (in global
token order, so the sample equals the single-process one), rank 0 solves, and the pruned weights
are broadcast.  Every rank then propagates its own shard through the pruned layer.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.mlp import MLPWeights
from ..core.stats import MLPStatistics


def init_from_env(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, else gloo). Returns the
    device this rank computes on (``cuda:LOCAL_RANK`` for CUDA, else ``device``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous block of n items."""
    if not active():
        return 0, n
    world, r = dist.get_world_size(), dist.get_rank()
    return n * r // world, n * (r + 1) // world


def local_positions(global_positions: Tensor | None, start_token: int, end_token: int) -> Tensor | None:
    """Global sample positions that fall in this rank's token range, shifted to local indices."""
    if global_positions is None:
        return None
    inside = (global_positions >= start_token) & (global_positions < end_token)
    return global_positions[inside] - start_token


def _device_for_collectives(t: Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_statistics(stats: MLPStatistics) -> None:
    """Sum the statistics of all ranks in place and gather the refit sample rows (global order)."""
    if not active():
        return
    for t in stats.state_tensors():
        buf = t.to(_device_for_collectives(t))
        dist.all_reduce(buf)
        t.copy_(buf)
    count = torch.tensor([stats.count], dtype=torch.long, device=_device_for_collectives(stats.gram))
    dist.all_reduce(count)
    stats.count = int(count)
    if stats.sample_positions is None:
        return
    d = stats.cross.shape[0]
    local = stats.sample_inputs()
    stats._sample_rows = _gather_rows(torch.zeros(0, d) if local is None else local)
    weights = stats.sample_weights()
    if weights is not None:
        stats._sample_weights = [w[:, 0] for w in _gather_rows(weights[:, None])]


def _gather_rows(local: Tensor) -> list[Tensor]:
    """Every rank's rows (n_r, d), in rank order (ranks hold consecutive token ranges)."""
    d = local.shape[1]
    device = _device_for_collectives(local)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, d, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = [torch.zeros(longest, d, device=device) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [g[: int(s)].cpu() for g, s in zip(gathered, sizes)]


def all_reduce_sum(values: list[float]) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_weights(
    weights: MLPWeights | None, template: MLPWeights, kept: Tensor | None
) -> tuple[MLPWeights, Tensor]:
    """Rank 0's pruned weights and kept indices on every rank (``template`` gives dtypes/devices)."""
    if not active():
        assert weights is not None and kept is not None
        return weights, kept
    device = _device_for_collectives(template.up)
    n_kept = torch.tensor([kept.numel() if kept is not None else 0], device=device)
    dist.broadcast(n_kept, 0)
    kept_buf = kept.to(device) if kept is not None else torch.zeros(int(n_kept), dtype=torch.long, device=device)
    dist.broadcast(kept_buf, 0)
    names = ("up", "down", "gate", "up_bias", "gate_bias", "down_bias")
    received: dict[str, Tensor | None] = {}
    for name in names:
        has = torch.tensor([int(weights is not None and getattr(weights, name) is not None)], device=device)
        dist.broadcast(has, 0)
        if not int(has):
            received[name] = None
            continue
        if rank() == 0:
            buf = getattr(weights, name).to(device, torch.float32).contiguous()
            shape = torch.tensor(list(buf.shape) + [0] * (2 - buf.dim()), device=device)
        else:
            shape = torch.zeros(2, dtype=torch.long, device=device)
        dist.broadcast(shape, 0)
        if rank() != 0:
            buf = torch.zeros(*[int(s) for s in shape if int(s) > 0], device=device)
        dist.broadcast(buf, 0)
        received[name] = buf.to(template.up.device)
    return template.with_fields(received), kept_buf.cpu()


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every rank (identity without torch.distributed)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
