"""Predicted peak accelerator memory of ``spap prune --device cuda``: one decoder layer at a time.

Only the layer being pruned, one calibration batch and the MLP's solve live on the device; the
weights and the calibration activations stay on the host (``runtime.memory`` plans those). The
terms are the tensors the pipeline allocates, checked on a CPU with ``TensorMeter`` (the same
tensors, counted as ``torch.cuda.max_memory_allocated`` counts them); the CUDA context (about
0.5 GiB per process, outside the allocator) comes on top."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig
from ..core.stats import CHUNK_TOKENS

PRODUCT_ROWS = 1024
"""Rows of G (and C) one float32 product block of the statistics adds at a time (``add_product``)."""
ATTENTION_BUFFERS = 7
"""Batch-sized (tokens x hidden) buffers of a layer forward while attention runs: the batch's input,
its norm, queries, keys and values (grouped keys and values expanded to all heads) and the output."""


KERNEL_COPY = "cuSOLVER's copy of the factor"
"""The plan's part that torch's CUDA kernels allocate inside one operation (no ``TensorMeter`` sees
it): ``cholesky_inverse`` on CUDA clones its m x m factor before solving against the identity
(ATen's ``_cholesky_inverse_cusolver_potrs_based``), one m x m matrix beside the three of the CPU."""


def peak_gib(phases: dict[str, dict[str, float]]) -> float:
    """The largest phase's total (GiB) of a plan whose phases are sums of named parts."""
    return max(sum(parts.values()) for parts in phases.values())


def peak_line(what: str, phases: dict[str, dict[str, float]]) -> str:
    """ "predicted peak {what} memory X GiB (while PHASE: part a + part b ...)" of the largest phase."""
    name, parts = max(phases.items(), key=lambda item: sum(item[1].values()))
    shown = " + ".join(f"{part} {gib:.2f}" for part, gib in parts.items() if gib >= 0.005)
    return f"predicted peak {what} memory {peak_gib(phases):.1f} GiB (while {name}: {shown})"


@dataclass
class DevicePlan:
    """Predicted peak allocated device memory (GiB): the largest of its phases, each a sum of parts."""

    phases: dict[str, dict[str, float]]

    @property
    def peak_gib(self) -> float:
        return peak_gib(self.phases)

    def phase_gib(self, name: str) -> float:
        return sum(self.phases[name].values())

    def tensor_gib(self, name: str) -> float:
        """The phase without what CUDA kernels allocate inside an operation: what a TensorMeter sees."""
        return self.phase_gib(name) - self.phases[name].get(KERNEL_COPY, 0.0)

    def line(self) -> str:
        return peak_line("GPU", self.phases)


def solver_matrices(sparsity: float, selection: str) -> float:
    """m x m matrices (G included) the solve holds at once: G, B = G + delta I and its Cholesky factor,
    then the factor and B^-1 (3); the penalty loop's rounds hold G, B^-1, U^T and L^-1 U^T (p x m each,
    p <= k = sparsity * m pruned neurons) and the p x p factor: 2 + 2 s + s^2 (more than 3 above
    s = 0.41)."""
    if selection != "penalty":
        return 3.0
    return max(3.0, 2 + 2 * sparsity + sparsity**2)


def predict_device_peak(
    d: int,
    m: int,
    layer_elements: int,
    outside_elements: int,
    cfg: PruneConfig,
    dtype: torch.dtype,
    outside_bytes: int = 4,
) -> DevicePlan:
    """Peak device memory of pruning MLPs of hidden size ``d`` and width ``m`` (GLU) in layers of
    ``layer_elements`` parameters with ``cfg``, layers computing in ``dtype``; ``outside_elements``
    parameters outside the layers (embeddings, head, final norm) at ``outside_bytes`` each.

    Per phase (T tokens a batch, b bytes of the compute dtype, q of G's dtype):
    - capture: the weights outside the layers + a batch's hidden states;
    - statistics: the layer in the compute dtype + the dense MLP in float32 (and in the compute dtype)
      + G (m x m) and C (d x m) + the larger of the batch's forward (attention: ``ATTENTION_BUFFERS``
      x T x d; MLP: its input, residual and norm, 3 x T x d, a float32 norm temporary, and gate, up and
      product, 3 x T x m) and the update (the captured z, x, y, the layer's output, a float32 chunk of
      z and y, and the largest of diag(G)'s product, ||y||^2's float64 operands and a product block);
    - solve: the dense MLP in float32 + ``solver_matrices`` m x m + four d x m (C, W_0, W and its
      update) + ``KERNEL_COPY`` where the inverse's moment (4 m x m) is the larger, or for score rules
      W_down and |W_down| in float64; + the refit's token rows (inputs, targets, gate, up, hidden)
      when it refits;
    - propagate: the pruned layer + the dense MLP (float32, compute dtype) + the larger of the
      forward and the error measurement (the dense MLP's gate, up and product, 3 x T x m, beside the
      captured z, at most T x m, and four T x d: input, output, captured x and y).

    Not planned: attention-head pruning's own statistics (``--target attn|both``), the dense probe of
    global allocations and the searches (in-memory runs only).
    """
    gib = 2**30
    b = dtype.itemsize
    q = cfg.solver.matrix_dtype.itemsize
    tokens = min(cfg.calibration.n_samples, cfg.runtime.batch_size) * cfg.calibration.seq_len
    chunk = min(CHUNK_TOKENS, tokens)
    mlp = 3 * d * m
    dense = {"dense MLP (float32)": 4 * mlp / gib}
    if b != 4:
        dense["dense MLP (compute dtype)"] = b * mlp / gib
    layer = {"layer (compute dtype)": b * layer_elements / gib}
    attention = ATTENTION_BUFFERS * tokens * d * b
    forward = max(attention, b * tokens * (3 * d + 3 * m) + 4 * tokens * d)
    solver = cfg.solver
    full = solver.needs_gram
    update = b * tokens * (m + 3 * d) + (4 * chunk * (m + d) if b != 4 else 0)
    # then one at a time: diag(G)'s float32 product, sum ||y||^2's float64 operands and product, a block
    update += max(4 * chunk * m, 24 * chunk * d, min(PRODUCT_ROWS, m) * m * (4 + q) if full else 0)
    if solver.needs_sample:  # after the refit, the second pass recomputes the dense targets per chunk
        update += 3 * chunk * m * b
    statistics_terms = {
        **layer,
        **dense,
        "G and C": q * (m * m + d * m) / gib if full else 8 * (m + d) / gib,
        "a batch's forward or update": max(forward, update) / gib,
    }
    if full:
        matrices = solver_matrices(cfg.sparsity, solver.selection_rule)
        # the inverse's moment (G, the factor, B^-1 and the kernel's copy) against the penalty rounds'
        kernel_copy = max(0.0, 4 - matrices)
        solve_terms = {
            "dense MLP (float32)": 4 * mlp / gib,
            "solve": q * (matrices * m * m + 4 * d * m) / gib,
            KERNEL_COPY: q * kernel_copy * m * m / gib,
        }
    else:  # scores: float64 vectors, W_down and |W_down| in float64
        solve_terms = {"dense MLP (float32)": 4 * mlp / gib, "solve": 8 * (2 * d * m + 4 * m) / gib}
    if solver.needs_sample:
        rows = solver.refit_tokens + solver.holdout_tokens
        solve_terms["refit rows"] = 4 * (2 * d + 3 * m) * rows / gib
    measure = b * tokens * (4 * d + 4 * m)
    propagate = {
        **layer,
        **dense,
        "a batch's forward or error measurement": max(forward, measure) / gib,
    }
    capture = {
        "weights outside the layers": outside_bytes * outside_elements / gib,
        "a batch's hidden states": 2 * tokens * d * b / gib,
    }
    return DevicePlan(
        {"capturing": capture, "statistics": statistics_terms, "solving": solve_terms, "propagating": propagate}
    )


def kept_on_host(
    cfg: PruneConfig, d: int, kept_width: int, head_dim: int, dtype: torch.dtype, stored: torch.dtype
) -> dict[str, float]:
    """GiB per phase that a ``TensorMeter`` on a CPU counts but a GPU run keeps on the host: a batch's
    recorded attention outputs and inputs (statistics, solve; during the layer forward the inputs are
    device memory too, so there the meter's figure falls one batch of hidden states short), its
    attention outputs, outputs and the layer's new MLP weights (``kept_width`` neurons, stored dtype;
    propagate), and the rotary cos / sin of the captured arguments. Run one batch (``n_samples <=
    batch_size``): more batches add theirs, more layers their pruned weights."""
    tokens = min(cfg.calibration.n_samples, cfg.runtime.batch_size) * cfg.calibration.seq_len
    batch = tokens * d * dtype.itemsize
    rotary = 2 * tokens * head_dim * stored.itemsize
    new_weights = 3 * d * kept_width * stored.itemsize
    return {
        "statistics": (2 * batch + rotary) / 2**30,
        "solve": (2 * batch + rotary) / 2**30,
        "propagate": (2 * batch + rotary + new_weights) / 2**30,
    }
