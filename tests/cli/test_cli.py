import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spap.cli import main
from spap.config import PruneConfig


def test_prune_command_writes_loadable_checkpoint_and_report(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            str(tiny_checkpoint),
            "--sparsity",
            "0.25",
            "--out",
            str(out),
            "--calib",
            str(text),
            "--n-samples",
            "4",
            "--seq-len",
            "32",
            "--compute-dtype",
            "float32",
            "--method",
            "spap",  # the published recipe, whose refit reports refit_accepted
            "--refit-rounds",
            "2",
            "--refit-tokens",
            "32",
            "--eval",
            "--ppl",
            str(text),
            "--ppl-seq-len",
            "32",
            "--eval-dtype",
            "float32",
        ]
    )
    assert code == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["widths"] == [36, 36, 36]
    assert report["calibration_shape"] == [4, 32]
    assert report["config"]["solver"]["refit_safeguard"] is True
    assert all(layer["refit_accepted"] in (True, False) for layer in report["layers"])
    assert report["metrics"]["dense"][str(text)]["perplexity"] > 1
    assert report["metrics"]["pruned"][str(text)]["seq_len"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 36
    assert "perplexity" in capsys.readouterr().out
    assert main(["plot", str(out)]) == 0
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_report_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "pruning.json not found" in capsys.readouterr().err


def test_eval_command_writes_eval_json(tiny_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score. " * 100)
    assert main(["eval", str(tiny_checkpoint), "--ppl", str(text), "--seq-len", "16", "--dtype", "float32"]) == 0
    data = json.loads((tiny_checkpoint / "eval.json").read_text())
    assert data["perplexity"][str(text)]["seq_len"] == 16


@pytest.mark.parametrize("fast_bf16, expected", [(False, "float32"), (True, "bfloat16")])
def test_eval_matmuls_in_bf16_only_where_the_cpu_runs_it_fast(
    tiny_checkpoint, tmp_path, monkeypatch, fast_bf16, expected
):
    """Without AMX / AVX512-BF16 bfloat16 matmuls are emulated (8x slower than float32 on a 2-core AMD
    EPYC): the default ("auto") evaluates in float32 there."""
    monkeypatch.setattr("spap.runtime.device.cpu_has_fast_bf16", lambda: fast_bf16)
    text = tmp_path / "t.txt"
    text.write_text("Some text to score. " * 100)
    assert main(["eval", str(tiny_checkpoint), "--ppl", str(text), "--seq-len", "16", "--device", "cpu"]) == 0
    assert json.loads((tiny_checkpoint / "eval.json").read_text())["perplexity"][str(text)]["dtype"] == expected


def test_eval_score_from_scores_the_second_half_of_each_window(tiny_checkpoint, tmp_path, capsys):
    from spap.evaluation.perplexity import perplexity
    from spap.io.models import load_model

    text = tmp_path / "t.txt"
    text.write_text("Some other text to score, with a few more words. " * 60)
    args = ["eval", str(tiny_checkpoint), "--ppl", str(text), "--seq-len", "16", "--dtype", "float32"]
    assert main(args + ["--score-from", "8"]) == 0
    got = json.loads((tiny_checkpoint / "eval.json").read_text())["perplexity"][str(text)]
    model, tokenizer, _ = load_model(str(tiny_checkpoint))
    expected = perplexity(model, tokenizer, text.read_text(), 16, dtype=torch.float32, score_from=8, progress=False)
    everything = perplexity(model, tokenizer, text.read_text(), 16, dtype=torch.float32, progress=False)
    assert got["score_from"] == 8 and got["n_predicted_tokens"] == expected.n_predicted_tokens
    assert got["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert got["perplexity"] != pytest.approx(everything.perplexity, rel=1e-3)
    assert "scored from position 8" in capsys.readouterr().out
    assert main(args + ["--score-from", "15"]) == 2
    err = capsys.readouterr().err
    assert "score_from must be in [0, seq_len - 1) = [0, 15), got 15" in err and "Loading weights" not in err


def test_bad_input_fails_with_clear_message_and_no_output(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["prune", str(tiny_checkpoint), "--sparsity", "1.2", "--out", str(out)]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "missing-model"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["prune", str(tiny_checkpoint), "--out", str(out), "--calib", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    args = [str(tmp_path / "missing-model"), "--out", str(out), "--allocation", "structprune"]
    assert main(["prune", *args, "--temperature", "0"]) == 2  # the config check runs before the model loads
    assert "temperature must be > 0" in capsys.readouterr().err
    assert not out.exists()


def test_self_generated_calibration_is_saved_and_reuse_reproduces_the_pruning(tiny_checkpoint, tmp_path):
    common = [
        "--sparsity",
        "0.25",
        "--n-samples",
        "3",
        "--seq-len",
        "16",
        "--compute-dtype",
        "float32",
        "--refit",
        "ls",
    ]
    first, second = tmp_path / "self", tmp_path / "reused"
    assert main(["prune", str(tiny_checkpoint), "--out", str(first), "--calib", "self", *common]) == 0
    ids = torch.load(first / "calibration_ids.pt")
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    reused = ["--calib", str(first / "calibration_ids.pt")]
    assert main(["prune", str(tiny_checkpoint), "--out", str(second), *reused, *common]) == 0
    assert not (second / "calibration_ids.pt").exists()  # only generated text is worth keeping
    a, b = (json.loads((d / "pruning.json").read_text()) for d in (first, second))
    assert [layer["kept"] for layer in a["layers"]] == [layer["kept"] for layer in b["layers"]]
    wa, wb = (AutoModelForCausalLM.from_pretrained(d).model.layers[1].mlp.down_proj.weight for d in (first, second))
    torch.testing.assert_close(wa, wb)


def test_solver_flags_reach_the_config():
    from spap.cli.parser import build_parser, config_from_args

    args = build_parser().parse_args(
        ["prune", "--out", "x", "--no-refit-safeguard", "--refit-proximal", "0.5", "--refit-input-noise", "0.3"]
    )
    solver = config_from_args(args).solver
    assert solver.refit_safeguard is False and solver.refit_proximal == 0.5 and solver.refit_input_noise == 0.3
    assert config_from_args(build_parser().parse_args(["prune", "--out", "x"])).solver.refit_safeguard is True


def test_head_flags_reach_the_config():
    from spap.cli.parser import build_parser, config_from_args

    args = ["prune", "--out", "x", "--target", "both", "--head-sparsity", "0.34", "--head-unit", "query"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert (cfg.target, cfg.head_sparsity, cfg.head_unit) == ("both", 0.34, "query")
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    assert config_from_args(build_parser().parse_args(["prune", "--out", "x"])).head_unit == "kv-group"


def test_cfsp_flags_reach_the_config():
    from spap.cli.parser import build_parser, config_from_args

    cfg = config_from_args(
        build_parser().parse_args(["prune", "--out", "x", "--method", "cfsp", "--angular-slope", "5"])
    )
    assert cfg.solver.method == "cfsp" and cfg.allocation_rule == "angular" and cfg.angular_slope == 5.0
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    default = config_from_args(build_parser().parse_args(["prune", "--out", "x", "--allocation", "angular"]))
    assert default.angular_slope == 128 * 2048 / 1e4 and default.solver.method == "spap-ls"
