"""Out-of-core pruning writes the checkpoint the in-memory path writes, with at most one layer resident."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import spap
from spap.config import PruneConfig, RuntimeConfig
from spap.io.shards import INDEX_FILE, SafetensorsCheckpoint, ShardWriter
from spap.pruning.offload import prune_offloaded
from spap.runtime.memory import shard_bytes
from spap.runtime.meta import StreamedLayers, empty_model, materialised_parameters

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import fast_config, logits


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(directory)
    return checkpoint.read(sorted(checkpoint.names()))


def config_without_versions(directory) -> dict:
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


def in_memory(source, out, cfg: PruneConfig, ids, dtype: torch.dtype):
    model = spap.load_pretrained(source)
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    spap.save_pruned(model, out, dtype=dtype)
    return report


def assert_same_checkpoint(a, b) -> None:
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    assert config_without_versions(a) == config_without_versions(b)


CASES = [
    ("llama", fast_config(0.3), torch.bfloat16),  # tied embeddings, bf16 input stays bf16
    ("qwen2", fast_config(0.5), torch.float32),  # attention biases, untied head
    ("gemma3_text", fast_config(0.3), torch.bfloat16),  # scaled embeddings, two kinds of layers
    ("opt", fast_config(0.3, method="flap"), torch.float32),  # learned positions, added biases (remote code)
    (
        "llama",
        PruneConfig(
            sparsity=0.3,
            target="both",
            head_sparsity=0.5,
            allocation="structprune",
            runtime=RuntimeConfig(compute_dtype="float32"),
        ),
        torch.bfloat16,
    ),
]


@pytest.mark.parametrize(("family", "cfg", "dtype"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_offloaded_pruning_writes_the_in_memory_checkpoint(family, cfg, dtype, tmp_path):
    source = tmp_path / "dense"
    tiny_model(family).to(dtype).save_pretrained(source)
    ids = tiny_ids()
    expected = in_memory(source, tmp_path / "memory", cfg, ids, dtype)
    report = prune_offloaded(source, tmp_path / "offload", cfg, calibration_ids=ids, max_shard_bytes=4096)
    assert [layer.kept for layer in report.layers] == [layer.kept for layer in expected.layers]
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "offload")
    assert (tmp_path / "offload" / INDEX_FILE).is_file()  # small shards: several files and an index
    assert report.extra["max_resident_layers"] == 1
    reloaded = spap.load_pretrained(tmp_path / "offload")
    assert reloaded.config.num_hidden_layers == tiny_model(family).config.num_hidden_layers
    assert json.loads((tmp_path / "offload" / "pruning.json").read_text())["offload"] is True


def test_stock_checkpoint_from_offload_loads_with_from_pretrained(tmp_path, monkeypatch):
    """... and the streamed run keeps layer-sized tensors out of glibc's heap (runtime.host_malloc)."""
    from spap.pruning import offload

    fixed: list[bool] = []
    monkeypatch.setattr(offload, "fix_mmap_threshold", lambda: fixed.append(True) or True)
    source = tmp_path / "dense"
    tiny_model("llama").save_pretrained(source)
    ids = tiny_ids()
    prune_offloaded(source, tmp_path / "out", fast_config(0.3), calibration_ids=ids)
    assert fixed == [True]
    model = spap.load_pretrained(source)
    spap.prune(model, config=fast_config(0.3), calibration_ids=ids)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(stock, ids), logits(model, ids))


def test_at_most_one_decoder_layer_is_materialised_while_pruning(tmp_path, monkeypatch):
    source = tmp_path / "dense"
    tiny_model("qwen2").save_pretrained(source)
    seen: list[int] = []
    load = StreamedLayers.load

    def counting_load(self, index):
        load(self, index)
        seen.append(sum(materialised_parameters(layer) > 0 for layer in self.layers))
        outside = materialised_parameters(self.model) - sum(materialised_parameters(layer) for layer in self.layers)
        assert outside == 0  # embeddings and head are freed once the inputs are captured

    monkeypatch.setattr(StreamedLayers, "load", counting_load)
    prune_offloaded(source, tmp_path / "out", fast_config(0.3), calibration_ids=tiny_ids())
    assert seen == [1, 1, 1]


def test_interrupted_offloaded_run_leaves_no_output(tmp_path, monkeypatch):
    source = tmp_path / "dense"
    tiny_model("llama").save_pretrained(source)
    release = StreamedLayers.release

    def interrupt_after_first_layer(self, index, write):
        release(self, index, write)
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamedLayers, "release", interrupt_after_first_layer)
    with pytest.raises(KeyboardInterrupt):
        prune_offloaded(source, tmp_path / "out", fast_config(0.3), calibration_ids=tiny_ids())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_skeleton_holds_no_weights_and_shard_writer_round_trips(tmp_path):
    source = tmp_path / "dense"
    tiny_model("opt").save_pretrained(source)
    assert materialised_parameters(empty_model(source)) == 0
    tensors = saved_tensors(source)
    writer = ShardWriter(tmp_path / "out", max_shard_bytes=10_000, dtype=torch.bfloat16)
    (tmp_path / "out").mkdir()
    for name, t in tensors.items():
        writer.add({name: t})
    files = writer.close()
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    for name, t in saved_tensors(tmp_path / "out").items():
        assert torch.equal(t, tensors[name].to(torch.bfloat16))
    with safe_open(str(tmp_path / "out" / files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_queued_tensors_never_alias_the_caller_s_storage(tmp_path):
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", max_shard_bytes=2**20)
    whole, base = torch.randn(4, 3), torch.randn(8, 3)
    writer.add({"owned": whole, "view": base[:4]}, owned=True)  # a view of a larger storage is copied
    writer.add({"tied": whole})  # not owned: copied even though it covers its storage
    whole.zero_(), base.zero_()
    writer.close()
    saved = saved_tensors(tmp_path / "out")
    assert saved["owned"].abs().sum() == 0  # given away: stored without a copy
    assert saved["view"].abs().sum() > 0 and saved["tied"].abs().sum() > 0


def test_output_shards_take_an_eighth_of_the_host_budget_within_bounds():
    assert shard_bytes(None) == 2**30
    assert shard_bytes(2.0) == 2**28
    assert shard_bytes(0.1) == 2**26 and shard_bytes(64.0) == 2**30
    # streamed runs: two of the largest layers, at least 64 MiB, never above the budget's share
    assert shard_bytes(None, 2**20) == 2**26 and shard_bytes(None, 2**27) == 2**28
    assert shard_bytes(None, 2**30) == 2**30 and shard_bytes(1.0, 2**27) == 2**27


def test_missing_safetensors_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_spilled_activations_give_the_same_pruned_model():
    """A host-memory budget below the activations sends them to disk; the result is unchanged."""
    ids = tiny_ids()
    cfg = fast_config(0.3)
    spilled_cfg = PruneConfig.from_dict(cfg.to_dict())
    spilled_cfg.runtime.max_host_memory_gib = 1e-9
    a, b = tiny_model("gemma2"), tiny_model("gemma2")
    report_a = spap.prune(a, config=cfg, calibration_ids=ids)
    report_b = spap.prune(b, config=spilled_cfg, calibration_ids=ids)
    assert not report_a.extra["activations_spilled"] and report_b.extra["activations_spilled"]
    assert [layer.kept for layer in report_a.layers] == [layer.kept for layer in report_b.layers]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_spill_directory_is_removed_and_batches_round_trip(tmp_path):
    from spap.runtime.spill import batch_buffer, spilling

    base = torch.arange(12.0).reshape(3, 4)
    with spilling(tmp_path) as directory:
        buffer = batch_buffer()
        buffer.append(base[1:])  # a view: only its own elements are written
        buffer.append((base, None))
        assert torch.equal(buffer[0], base[1:]) and buffer[1][1] is None and len(buffer) == 2
        assert sum(p.stat().st_size for p in directory.iterdir()) < 2 * base.numel() * 4 + 4096
    assert list(tmp_path.iterdir()) == []
    assert batch_buffer() == []  # outside the context: a plain list
