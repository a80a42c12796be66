"""Tests for cmpq.kmeans: quality against the exact 1-D optimum, semantics, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmpq.quant.kmeans import nearest_centroid, weighted_kmeans_1d, weighted_sse


def _dp_optimum(v: np.ndarray, w: np.ndarray, k: int) -> float:
    """Exact minimum of sum w (v - c)^2 over k clusters, O(k N^2).

    In 1-D some optimal clustering consists of contiguous runs of the sorted values, so the
    optimum is a shortest path over cut positions: D[m][j] = min_i D[m-1][i] + cost(i, j).
    """
    order = np.argsort(v, kind="stable")
    x = v[order].astype(np.float64)
    wt = w[order].astype(np.float64)
    x = x - (wt * x).sum() / wt.sum()
    n = len(x)
    pw = np.concatenate([[0.0], np.cumsum(wt)])
    ps = np.concatenate([[0.0], np.cumsum(wt * x)])
    pq = np.concatenate([[0.0], np.cumsum(wt * x * x)])
    d = np.full(n + 1, np.inf)
    d[0] = 0.0
    for _ in range(k):
        nd = np.empty(n + 1)
        for j in range(n + 1):
            i = np.arange(j + 1)
            sw, s, q = pw[j] - pw[i], ps[j] - ps[i], pq[j] - pq[i]
            cost = np.where(sw > 0, q - s * s / np.where(sw > 0, sw, 1.0), 0.0)
            nd[j] = (d[: j + 1] + np.maximum(cost, 0.0)).min()
        d = nd
    return float(d[n])


def _random_problem(seed: int, b: int, n: int, weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((b, n)).astype(np.float32)
    if weights == "ones":
        w = np.ones((b, n), np.float32)
    elif weights == "exp":
        w = rng.exponential(size=(b, n)).astype(np.float32)
    else:
        w = rng.lognormal(0.0, 1.5, size=(b, n)).astype(np.float32)
    return torch.from_numpy(v), torch.from_numpy(w)


def _ratios(v: torch.Tensor, w: torch.Tensor, k: int, **kw: object) -> np.ndarray:
    c, a = weighted_kmeans_1d(v, w, k, **kw)  # type: ignore[arg-type]
    sse = weighted_sse(v, w, c, a).numpy()
    opt = np.array([_dp_optimum(v[i].numpy(), w[i].numpy(), k) for i in range(v.shape[0])])
    assert np.all(sse >= opt * (1 - 1e-6) - 1e-9), "beat the exact optimum: DP or SSE is wrong"
    return sse / opt


@pytest.mark.parametrize("init", ["companded", "quantile", "kmeans++"])
@pytest.mark.parametrize("n", [12, 20])
def test_k2_is_exact(init: str, n: int) -> None:
    v, w = _random_problem(n, 40, n, "exp")
    r = _ratios(v, w, 2, init=init)
    np.testing.assert_allclose(r, 1.0, rtol=1e-5)


@pytest.mark.parametrize("weights", ["ones", "exp", "lognormal"])
@pytest.mark.parametrize("k", [3, 4])
def test_close_to_exact_optimum(k: int, weights: str) -> None:
    # Lloyd + refinement is a local search: most rows hit the optimum, a few stay above it.
    # Fixed seeds make this deterministic; the bounds have margin over the observed values
    # (mean <= 1.015, >= 91 % of rows within 2 %, worst row <= 1.39).
    ratios = np.concatenate(
        [_ratios(*_random_problem(100 * k + n, 40, n, weights), k) for n in (12, 16, 20)]
    )
    assert ratios.mean() <= 1.02
    assert (ratios <= 1.02).mean() >= 0.85
    assert ratios.max() <= 1.6


def test_refinement_never_hurts_and_usually_helps() -> None:
    v, w = _random_problem(7, 60, 20, "lognormal")
    for k in (3, 4):
        plain_c, plain_a = weighted_kmeans_1d(v, w, k, refine=False)
        ref_c, ref_a = weighted_kmeans_1d(v, w, k)
        plain = weighted_sse(v, w, plain_c, plain_a)
        refined = weighted_sse(v, w, ref_c, ref_a)
        assert torch.all(refined <= plain * (1 + 1e-6))
        assert refined.sum() < 0.95 * plain.sum()


@pytest.mark.parametrize("init", ["companded", "quantile", "kmeans++"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_well_separated_clusters_are_found_exactly(init: str, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    b, per = 16, 5
    centres = torch.arange(k, dtype=torch.float32) * 10.0
    v = centres.repeat_interleave(per) + 0.3 * torch.randn(b, k * per, generator=gen)
    w = torch.rand(b, k * per, generator=gen) + 0.1
    perm = torch.randperm(k * per, generator=gen)
    v, w = v[:, perm], w[:, perm]
    truth = (torch.arange(k).repeat_interleave(per))[perm]

    c, a = weighted_kmeans_1d(v, w, k, init=init, seed=3)
    assert torch.equal(a, truth.expand(b, -1))
    expected = torch.stack(
        [(w * v * (truth == j)).sum(1) / (w * (truth == j)).sum(1) for j in range(k)], dim=1
    )
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-4)
    opt = [_dp_optimum(v[i].numpy(), w[i].numpy(), k) for i in range(b)]
    np.testing.assert_allclose(weighted_sse(v, w, c, a).numpy(), opt, rtol=1e-4)


def test_output_contract_and_nearest_assignment() -> None:
    v, w = _random_problem(3, 32, 200, "lognormal")
    for k in (1, 5, 16):
        c, a = weighted_kmeans_1d(v.double(), w, k)
        assert c.dtype == torch.float32 and c.shape == (32, k)
        assert a.dtype == torch.int64 and a.shape == (32, 200)
        assert int(a.min()) >= 0 and int(a.max()) < k
        assert torch.all(c[:, 1:] >= c[:, :-1])
        dist = (v.unsqueeze(2) - c.unsqueeze(1)).abs()  # [B, N, k]
        chosen = dist.gather(2, a.unsqueeze(2)).squeeze(2)
        assert torch.all(chosen <= dist.amin(dim=2) + 1e-6)
        assert torch.equal(nearest_centroid(v, c), a)
    # k = 1: the weighted mean
    c, _ = weighted_kmeans_1d(v, w, 1)
    torch.testing.assert_close(c[:, 0], (w * v).sum(1) / w.sum(1), rtol=0, atol=1e-5)


def test_heavy_weight_pulls_its_centroid() -> None:
    v = torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0, 12.0]])
    c, _ = weighted_kmeans_1d(v, None, 2)
    torch.testing.assert_close(c, torch.tensor([[1.0, 11.0]]))
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 100.0])
    c, a = weighted_kmeans_1d(v, w, 2)
    assert a.tolist() == [[0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(c[0, 1], torch.tensor((10.0 + 11.0 + 1200.0) / 102.0))
    assert c[0, 1] > 11.8
    # a shared [N] weight vector means the same as the expanded [B, N] one
    vv = torch.cat([v, v.flip(1)])
    c1, a1 = weighted_kmeans_1d(vv, w, 2)
    c2, a2 = weighted_kmeans_1d(vv, w.expand(2, -1), 2)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)


@pytest.mark.parametrize("refine", [True, False])
def test_batched_equals_per_row(refine: bool) -> None:
    # Convergence is tracked per row, so a row's result does not depend on its batch mates.
    # (Only for the deterministic quantile init: k-means++ draws all rows from one generator.)
    v, w = _random_problem(11, 12, 64, "lognormal")
    c, a = weighted_kmeans_1d(v, w, 6, refine=refine)
    for i in range(v.shape[0]):
        ci, ai = weighted_kmeans_1d(v[i : i + 1], w[i : i + 1], 6, refine=refine)
        torch.testing.assert_close(ci[0], c[i], rtol=0, atol=1e-6)
        assert torch.equal(ai[0], a[i])


def test_kmeanspp_deterministic_for_seed() -> None:
    v, w = _random_problem(5, 16, 50, "exp")
    for refine in (False, True):
        runs = [
            weighted_kmeans_1d(v, w, 4, init="kmeans++", seed=s, refine=refine) for s in (1, 1, 2)
        ]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        if not refine:
            assert not torch.equal(runs[0][0], runs[2][0])  # the seed is actually used


def test_few_values_are_reproduced_exactly() -> None:
    v = torch.tensor([[3.0, -1.0, 2.0], [5.0, 5.0, 0.5]])
    c, a = weighted_kmeans_1d(v, None, 4)
    assert c.tolist() == [[-1.0, 2.0, 3.0, 3.0], [0.5, 5.0, 5.0, 5.0]]
    assert torch.all(weighted_sse(v, None, c, a) == 0)
    assert torch.equal(c.gather(1, a), v)
    # more values than centroids but fewer distinct values: still zero error
    v = torch.tensor([[0.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0, 0.0]])
    c, a = weighted_kmeans_1d(v, None, 4)
    assert weighted_sse(v, None, c, a).item() == 0


def test_constant_rows_and_zero_weights() -> None:
    v = torch.stack([torch.full((10,), 2.5), torch.linspace(-1, 1, 10), torch.linspace(0, 9, 10)])
    w = torch.ones(3, 10)
    w[1] = 0.0  # all-zero row: treated as uniform
    w[2, :5] = 0.0  # zero-weight values do not pull centroids
    c, a = weighted_kmeans_1d(v, w, 3)
    assert torch.all(c[0] == 2.5) and weighted_sse(v[:1], None, c[:1], a[:1]).item() == 0
    cu, au = weighted_kmeans_1d(v[1:2], None, 3)
    assert torch.equal(c[1], cu[0]) and torch.equal(a[1], au[0])
    assert torch.all(c[2] >= 4.5)  # all three centroids serve the weighted half 5..9
    assert weighted_sse(v[2:], w[2:], c[2:], a[2:]).item() <= 1.0 + 1e-5  # {5,6},{7},{8,9}


def test_weighted_sse_matches_definition() -> None:
    v, w = _random_problem(2, 4, 30, "exp")
    c = torch.tensor([[-1.0, 0.0, 1.0]]).expand(4, -1)
    a = nearest_centroid(v, c)
    expected = (w.double() * (v.double() - c.double().gather(1, a)) ** 2).sum(1)
    torch.testing.assert_close(weighted_sse(v, w, c, a), expected)
    assert weighted_sse(v, w, c, a).dtype == torch.float64


def test_nearest_centroid_shared_table_ties_and_errors() -> None:
    v = torch.tensor([[-5.0, 0.0, 0.5, 0.6, 1.0, 9.0]])
    table = torch.tensor([0.0, 1.0, 1.0, 4.0])
    assert nearest_centroid(v, table).tolist() == [[0, 0, 0, 1, 1, 3]]  # 0.5 is a tie -> lower
    assert torch.equal(nearest_centroid(v, table), nearest_centroid(v, table.unsqueeze(0)))
    with pytest.raises(ValueError, match="sorted"):
        nearest_centroid(v, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="rows"):
        nearest_centroid(v, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one"):
        nearest_centroid(v, torch.zeros(1, 0))


def test_input_validation() -> None:
    v = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="k"):
        weighted_kmeans_1d(v, None, 0)
    with pytest.raises(ValueError, match="init"):
        weighted_kmeans_1d(v, None, 2, init="random")
    with pytest.raises(ValueError, match="2-D"):
        weighted_kmeans_1d(v[0], None, 2)
    with pytest.raises(ValueError, match="shape"):
        weighted_kmeans_1d(v, torch.ones(7), 2)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans_1d(v, -torch.ones(8), 2)
    with pytest.raises(ValueError, match="NaN"):
        weighted_kmeans_1d(torch.tensor([[0.0, float("nan")]]), None, 2)
    with pytest.raises(ValueError, match="column"):
        weighted_kmeans_1d(torch.zeros(2, 0), None, 2)
    c, a = weighted_kmeans_1d(torch.zeros(0, 8), None, 2)
    assert c.shape == (0, 2) and a.shape == (0, 8)


@pytest.mark.parametrize("refine", [False, True])
def test_chunks_of_rows_give_the_whole_batch_results_exactly(monkeypatch, refine):
    """Large batches run a chunk of rows at a time (bounded memory): same bits."""
    from cmpq.quant import kmeans

    generator = torch.Generator().manual_seed(1)
    values = torch.randn(37, 50, generator=generator) * torch.rand(37, 1, generator=generator)
    weights = torch.rand(37, 50, generator=generator)
    weights[3] = 0  # an all-zero row falls back to uniform weights in every chunk
    start = torch.sort(torch.randn(37, 4, generator=generator), dim=1).values
    whole = [
        *kmeans.weighted_kmeans_1d_each(values, weights, [2, 4, 8], refine=refine),
        kmeans.weighted_kmeans_1d(values, weights, 4, init=start, refine=False),
    ]
    monkeypatch.setattr(kmeans, "CHUNK_VALUES", 120)  # 2 rows per chunk, a ragged last one
    assert len(kmeans.row_chunks(37, 50)) == 19
    chunked = [
        *kmeans.weighted_kmeans_1d_each(values, weights, [2, 4, 8], refine=refine),
        kmeans.weighted_kmeans_1d(values, weights, 4, init=start, refine=False),
    ]
    for (c1, a1), (c2, a2) in zip(whole, chunked, strict=True):
        assert torch.equal(c1, c2) and torch.equal(a1, a2)


def test_column_distortions_in_chunks_are_the_whole_layers(monkeypatch):
    from cmpq.alloc.rd import RD_WIDTHS
    from cmpq.quant import kmeans
    from cmpq.quant.tables import column_distortions

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 30, generator=generator)
    energy = torch.rand(30, generator=generator).double()
    keep = torch.rand(40, 30, generator=generator) > 0.05
    whole = column_distortions(weight, energy, keep, RD_WIDTHS)
    monkeypatch.setattr(kmeans, "CHUNK_VALUES", 100)
    assert torch.equal(column_distortions(weight, energy, keep, RD_WIDTHS), whole)
