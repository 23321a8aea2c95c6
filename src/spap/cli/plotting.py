"""Per-layer plot of a pruned checkpoint: kept MLP width (and KV groups) and layer error vs depth."""

from __future__ import annotations

from pathlib import Path

from ..io.checkpoint import read_report


def plot_layers(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Draw kept width per layer (bars, left axis) and relative layer error (line, right, log scale).

    Returns the PNG path (default: <checkpoint>/layers.png).  Needs matplotlib (extra ``spap[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("spap plot needs matplotlib: pip install 'spap[plot]'") from exc
    report = read_report(checkpoint)
    layers = report["layers"]
    index = [layer["index"] for layer in layers]
    before = [layer["width_before"] for layer in layers]
    after = [layer["width_after"] for layer in layers]
    errors = [max(layer["error"], 1e-12) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers)), 4.2))
    ax.bar(index, before, color="0.85", label="width before")
    ax.bar(index, after, color="tab:blue", label="width kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("MLP neurons")
    twin = ax.twinx()
    twin.plot(index, errors, color="tab:red", marker=".", label="relative layer error")
    twin.set_yscale("log")
    twin.set_ylabel("||y_pruned - y_dense||² / ||y_dense||²")
    solver = report["config"].get("solver", {})
    title = (
        f"{solver.get('method', '?')}, sparsity {report['config'].get('sparsity', 0):.0%}, "
        f"allocation {report['config'].get('allocation', '?')}"
    )
    if any(layer.get("kv_groups_kept") is not None for layer in layers):
        kept = [len(layer["kv_groups_kept"]) if layer.get("kv_groups_kept") is not None else None for layer in layers]
        title += f"; KV groups kept {min(k for k in kept if k is not None)}..{max(k for k in kept if k is not None)}"
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(out) if out else Path(checkpoint) / "layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
