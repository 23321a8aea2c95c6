"""ShardWriter.add_rows writes a tensor from row blocks, never whole, into a file safetensors reads
as if the tensor had been saved at once."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from spap.io.shards import INDEX_FILE, SafetensorsCheckpoint, ShardWriter, all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_written_in_row_blocks_reads_back_equal(tmp_path, dtype):
    big = torch.randn(37, 5)
    small = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2)}
    writer = ShardWriter(tmp_path, max_shard_bytes=2**20, dtype=dtype)
    writer.add(small)
    writer.add_rows("embed.weight", (37, 5), (big[i : i + 8] for i in range(0, 37, 8)))  # 8+8+8+8+5 rows
    writer.add({"c.weight": torch.randn(4, 4)})
    files = writer.close()
    assert len(files) == 3 and (tmp_path / INDEX_FILE).is_file()  # the streamed tensor has a shard of its own
    read = SafetensorsCheckpoint(tmp_path).read(["embed.weight", "a.weight"])
    assert torch.equal(read["embed.weight"], big.to(dtype)) and read["embed.weight"].dtype == dtype
    assert torch.equal(read["a.weight"], small["a.weight"].to(dtype))
    with safe_open(str(tmp_path / files[1]), "pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == ["embed.weight"]


def test_row_blocks_that_do_not_fill_the_shape_are_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="the row blocks hold 80 bytes, the shape"):
        writer.add_rows("x", (6, 5), [torch.zeros(4, 5)])
    with pytest.raises(ValueError, match="a row block of shape"):
        writer.add_rows("y", (6, 5), [torch.zeros(6, 4)])


@pytest.mark.parametrize("bad", [None, 0, 9, 10, 23])
def test_all_finite_finds_a_bad_value_in_any_block(bad):
    tensor = torch.randn(4, 6, dtype=torch.bfloat16)
    if bad is not None:
        tensor.view(-1)[bad] = float("nan") if bad % 2 else float("inf")
    assert all_finite(tensor, block_elements=10) == (bad is None) == bool(torch.isfinite(tensor).all())
