"""Data-parallel calibration: 2 CPU processes (gloo) give the same pruned model as 1 process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spap

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import fast_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, refit: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        spap.prune(model, config=fast_config(0.3, refit=refit), calibration_ids=tiny_ids(n=8, seq_len=24))
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("refit", ["ls", "alternating"])
def test_two_gloo_processes_match_one_process(refit, tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), refit, out), nprocs=2, join=True)
    parallel = torch.load(out)
    model = tiny_model("llama")
    spap.prune(model, config=fast_config(0.3, refit=refit), calibration_ids=tiny_ids(n=8, seq_len=24))
    single = model.state_dict()
    assert parallel.keys() == single.keys()
    for name, value in single.items():
        assert value.shape == parallel[name].shape, name
        torch.testing.assert_close(parallel[name], value, rtol=2e-3, atol=2e-4, msg=name)


def offload_worker(rank: int, world: int, port: int, source: str, out: str) -> None:
    from spap.pruning.offload import prune_offloaded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        prune_offloaded(source, out, fast_config(0.3), calibration_ids=tiny_ids(n=8, seq_len=24))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stream_the_layers_and_rank_0_writes(tmp_path):
    """Out-of-core pruning under data parallelism: every rank streams each layer, rank 0 writes the
    checkpoint the single-process in-memory path writes."""
    from .test_offload import saved_tensors

    source, out = tmp_path / "source", tmp_path / "out"
    tiny_model("llama").save_pretrained(source)
    mp.spawn(offload_worker, args=(2, free_port(), str(source), str(out)), nprocs=2, join=True)
    model = spap.load_pretrained(source)
    spap.prune(model, config=fast_config(0.3), calibration_ids=tiny_ids(n=8, seq_len=24))
    spap.save_pruned(model, tmp_path / "single")
    streamed, single = saved_tensors(out), saved_tensors(tmp_path / "single")
    assert streamed.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(streamed[name], value, rtol=2e-3, atol=2e-4, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "single", "source"]
