import logging

import pytest
import torch

from spap.io.calibration import bundled_text, read_text_file, sample_windows

from ..conftest import FAMILIES


def test_windows_are_disjoint_deterministic_and_sized():
    ids = torch.arange(1000)
    a = sample_windows(ids, 5, 100, seed=0)
    b = sample_windows(ids, 5, 100, seed=0)
    assert a.shape == (5, 100) and torch.equal(a, b)
    assert a.flatten().unique().numel() == 500  # no overlap
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in a)  # contiguous text
    assert not torch.equal(a, sample_windows(ids, 5, 100, seed=1))


def test_short_text_gives_fewer_windows_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        rows = sample_windows(torch.arange(250), 8, 100, seed=0)
    assert rows.shape == (2, 100)
    assert "only 2 windows" in caplog.text
    with caplog.at_level(logging.WARNING):
        rows = sample_windows(torch.arange(30), 8, 100, seed=0)
    assert rows.shape == (1, 30)


def test_bos_is_prepended_to_every_window():
    rows = sample_windows(torch.arange(10, 1010), 3, 50, seed=0, bos_id=1)
    assert rows.shape == (3, 50) and (rows[:, 0] == 1).all() and (rows[:, 1:] >= 10).all()


def test_bundled_text_splits_are_disjoint():
    calib, held = bundled_text("calibration"), bundled_text("heldout")
    assert len(calib) > 5 * len(held) > 0
    assert held[:200] not in calib
    assert "Project Gutenberg" not in held


def test_wikitext_layout_and_missing_file(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_bytes(b" = Title = \r\n\r\n Body line one .\r\n Body two .\r\n")
    assert read_text_file(f) == " = Title = \n\n Body line one .\n\n Body two ."
    with pytest.raises(FileNotFoundError):
        read_text_file(tmp_path / "absent.txt")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_self_generated_calibration_is_seeded_and_starts_at_bos(family, dtype):
    from spap.io.calibration import self_generated

    from ..conftest import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model(family), tiny_tokenizer()
    a = self_generated(model, tokenizer, 3, 12, seed=0, batch_size=2, dtype=dtype)
    assert a.shape == (3, 12) and (a[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(a, self_generated(model, tokenizer, 3, 12, seed=0, batch_size=2, dtype=dtype))
    assert not torch.equal(a, self_generated(model, tokenizer, 3, 12, seed=1, batch_size=2, dtype=dtype))
    assert next(model.parameters()).dtype == torch.float32  # generation ran on a copy


def test_generation_weights_are_a_cast_copy_and_come_back_bit_for_bit():
    from spap.io.calibration import weights_as

    from ..conftest import tiny_model

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.dtype for k, v in model.named_buffers()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in before.values())  # bf16 would lose bits
    with pytest.raises(RuntimeError, match="inside"):
        with weights_as(model, None, torch.bfloat16) as where:
            assert where == torch.device("cpu")
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            assert {k: v.dtype for k, v in model.named_buffers()} == buffers  # rotary frequencies stay fp32
            raise RuntimeError("inside")  # the weights come back on errors too
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_self_generation_progress_counts_every_generated_token(monkeypatch):
    """The bar ends at n_samples x (seq_len - 1): the prompt (BOS) is not counted, a last short batch is."""
    import spap.io.calibration as calibration

    from ..conftest import tiny_model, tiny_tokenizer

    totals: list[int] = []
    updates: list[int] = []

    class RecordingBar:
        def __init__(self, total, **kwargs):
            totals.append(total)

        def update(self, n):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(calibration, "tqdm", RecordingBar)
    ids = calibration.self_generated(tiny_model("llama"), tiny_tokenizer(), 3, 12, seed=0, batch_size=2)
    assert ids.shape == (3, 12)
    assert totals == [3 * 11] and sum(updates) == 3 * 11 and updates == [2] * 11 + [1] * 11


def test_token_files_are_cut_to_the_requested_shape_and_bad_files_fail(tmp_path, caplog):
    from spap.config import CalibrationConfig
    from spap.io.calibration import calibration_tokens

    path = tmp_path / "ids.pt"
    torch.save(torch.arange(60).reshape(4, 15), path)
    ids = calibration_tokens(None, CalibrationConfig(str(path), n_samples=2, seq_len=10))
    assert torch.equal(ids, torch.arange(60).reshape(4, 15)[:2, :10])
    with caplog.at_level(logging.WARNING):
        assert calibration_tokens(None, CalibrationConfig(str(path), n_samples=8, seq_len=10)).shape == (4, 10)
    assert "asked for 8 x 10" in caplog.text
    torch.save(torch.rand(3, 5), path)
    with pytest.raises(ValueError, match="2-D integer tensor"):
        calibration_tokens(None, CalibrationConfig(str(path)))
    with pytest.raises(FileNotFoundError, match="token file"):
        calibration_tokens(None, CalibrationConfig(str(tmp_path / "absent.pt")))
