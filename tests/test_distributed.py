"""Data-parallel calibration: 2 CPU processes (gloo) give the same pruned model as 1 process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spap

from .conftest import tiny_ids, tiny_model
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
