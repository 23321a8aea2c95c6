import pytest
import torch

from spap.core import MLPStatistics, SolverConfig
from spap.core.heads import prune_query_heads, query_head_columns
from spap.core.scores import bottom_k, first_k_per_block

HEAD_DIM, D = 4, 10


def head_problem(activations: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, MLPStatistics]:
    """o_proj weight (D, columns) and the statistics of y = W_o a on ``activations`` (n, columns)."""
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(D, activations.shape[1], generator=g, dtype=torch.float64)
    stats = MLPStatistics(activations.shape[1], D)
    stats.add(activations, activations @ w_o.T)
    return w_o, stats


def test_first_k_per_block_takes_the_first_units_of_every_block_in_order():
    blocks = torch.tensor([0, 0, 0, 1, 1, 1])
    order = torch.tensor([4, 3, 0, 5, 2, 1])
    assert first_k_per_block(order, 1, blocks).nonzero().flatten().tolist() == [0, 4]
    assert first_k_per_block(order, 2, blocks).nonzero().flatten().tolist() == [0, 2, 3, 4]
    scores = torch.tensor([0.1, 0.2, 5.0, 0.3, 0.4, 0.05])
    assert bottom_k(scores, 2).nonzero().flatten().tolist() == [0, 5]  # global: both lowest
    assert bottom_k(scores, 1, blocks).nonzero().flatten().tolist() == [0, 5]
    assert bottom_k(scores, 2, blocks).nonzero().flatten().tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("selection", ["penalty", "score"])
def test_query_heads_duplicated_within_each_group_are_removed_with_zero_error(selection):
    """6 query heads in 2 KV groups; head 2 copies head 0 and head 4 copies head 5: removing one
    head per group loses nothing only if those duplicates go, one in each group."""
    g = torch.Generator().manual_seed(1)
    heads = [torch.randn(400, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(6)]
    heads[2], heads[4] = heads[0].clone(), heads[5].clone()
    a = torch.cat(heads, dim=1)
    w_o, stats = head_problem(a)
    cfg = SolverConfig(selection=selection, refit="ls", damping=1e-10)
    result = prune_query_heads(w_o, None, stats, n_heads=6, n_kv_heads=2, n_prune_per_group=1, cfg=cfg)
    assert len(result.kept) == 4
    assert sum(h < 3 for h in result.kept) == 2 and sum(h >= 3 for h in result.kept) == 2
    assert {0, 2} - set(result.kept) and {4, 5} - set(result.kept)
    assert result.error < 1e-9
    # the re-fit W_o is the least-squares solution on the kept columns
    columns = torch.isin(query_head_columns(6, HEAD_DIM), torch.tensor(result.kept))
    expected = torch.linalg.lstsq(a[:, columns], a @ w_o.T).solution.T
    torch.testing.assert_close(result.o_weight, expected.float(), rtol=1e-4, atol=1e-4)


def test_every_kv_group_loses_the_same_number_of_query_heads():
    """The two weakest heads share group 0; a global ranking would take both, the per-group rule one each."""
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.01, 0.02, 1.0, 1.0, 3.0, 3.0]).repeat_interleave(HEAD_DIM)
    a = torch.randn(300, 6 * HEAD_DIM, generator=g, dtype=torch.float64) * scale
    w_o, stats = head_problem(a)
    for selection in ("penalty", "score"):
        result = prune_query_heads(w_o, None, stats, 6, 2, 1, SolverConfig(selection=selection))
        assert result.kept == [1, 2, 4, 5]  # the weakest head of each group goes


def test_invalid_query_head_counts_raise():
    w_o, stats = head_problem(torch.randn(50, 6 * HEAD_DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="query heads of each KV group"):
        prune_query_heads(w_o, None, stats, 6, 2, 3, SolverConfig())
    with pytest.raises(ValueError, match="cannot hold"):
        prune_query_heads(w_o, None, stats, 6, 4, 1, SolverConfig())
