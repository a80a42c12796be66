"""Weighted 1-D k-means, batched over many independent problems.

This is the non-uniform (look-up-table) quantizer: each row of ``values`` is one problem (e.g.
one weight row), ``weights`` say how much each value's rounding error costs (e.g. the energy of
the matching input activation), and the ``k = 2**bits`` centroids of a row are its table.  The
objective per row is ``sum_n w_n * (v_n - c[a_n])**2``.

Why 1-D matters: with centroids sorted, the nearest centroid of a value is found by binary search
over the ``k-1`` midpoints (``torch.searchsorted``, O(N log k)) instead of an O(N k) distance
matrix, and every row runs in the same tensor ops, so a whole weight matrix is quantized with no
Python loop over rows.  Lloyd's updates keep the centroids sorted (each cluster is an interval
between midpoints, and its mean stays inside it); we re-sort anyway to be robust to rounding.

Lloyd's algorithm alone is a poor local optimiser here: on heavy-tailed rows (LLM weights) its
fixed points can sit far above the optimum (quantile seeds all sit in the bulk, outliers get
lumped together, and a heavy value just past a midpoint pins it).  The default seeds therefore
follow the high-rate optimal point density ``p^(1/3)`` (``init="companded"``), and by default
Lloyd is followed by a local search over the partition in sorted order (``refine=True``): exact
coordinate descent on single cluster boundaries plus merge-two-runs/split-another moves, scored
in O(1) per candidate from prefix sums; it is exact for ``k = 2``.  On the weight columns of one
smollm2-135m block (``benchmarks/results/kmeans-smollm2-135m.md``), Lloyd from quantile seeds
ends 1.0-1.6x above the best fit found at 2-4 bits and 2.1-93x above it at 5-8 bits; from
companded seeds 1.00-1.40x; the search closes the rest.

Empty clusters are re-seeded deterministically: an empty centroid is moved onto the value with
the largest weighted squared error in its row (the r-th empty cluster of a row takes the r-th
largest error).  That strictly lowers the objective, whereas keeping a stale centroid would waste
a table entry, which at 2-3 bits is a large share of the table.

Each row is sorted once. In 1-D a Lloyd cluster is the run of sorted values between two midpoints,
so an iteration only needs the k-1 midpoints' positions in the sorted row (``searchsorted`` of k-1
midpoints into N values, O(k log N)) and the runs' weighted sums from float64 prefix sums, instead
of assigning all N values. The prefix sums are centred on the row's weighted mean, so the float64
run means stay accurate when a row's values sit far from zero; the refinement uses the same sums
(about 150 bytes of temporaries per value: chunk the rows of very large matrices).
"""

from __future__ import annotations

import torch

__all__ = [
    "nearest_centroid",
    "row_chunks",
    "weighted_kmeans_1d",
    "weighted_kmeans_1d_each",
    "weighted_sse",
]

_INITS = ("companded", "quantile", "kmeans++")


def _check_values(values: torch.Tensor) -> torch.Tensor:
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, N], got shape {tuple(values.shape)}")
    if values.dtype.is_complex:
        raise TypeError(f"values must be real, got dtype {values.dtype}")
    v = values.to(torch.float32).contiguous()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("values contain NaN or infinity")
    return v


def _prepare_weights(weights: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """Weights as float32 [B, N]; a row whose weights are all zero falls back to uniform.

    The fallback keeps the problem well posed (an all-zero row would make every table optimal)
    and gives that row the plain unweighted k-means table.
    """
    B, N = v.shape
    if weights is None:
        return torch.ones_like(v)
    w = weights.to(device=v.device, dtype=torch.float32)
    if w.shape == (N,):
        w = w.unsqueeze(0).expand(B, N)
    elif w.shape != (B, N):
        raise ValueError(
            f"weights must have shape [B, N] = {[B, N]} or [N] = {[N]}, got {list(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain NaN or infinity")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    zero_rows = (w > 0).sum(dim=1, keepdim=True) == 0
    return torch.where(zero_rows, torch.ones_like(w), w).contiguous()


def _nearest(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid index for sorted ``c`` (no checks); ties go to the lower centroid."""
    mids = c[..., :-1] * 0.5 + c[..., 1:] * 0.5
    return torch.searchsorted(mids.contiguous(), v.contiguous(), side="left")


def nearest_centroid(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value, by binary search over midpoints.

    Args:
        values: ``[B, N]`` real tensor.
        centroids: ``[B, k]`` (one table per row) or ``[k]`` (one table shared by all rows),
            sorted ascending along the last dimension; duplicates are allowed.

    Returns:
        int64 ``[B, N]`` indices into the last dimension of ``centroids``.  A value exactly
        half-way between two centroids goes to the lower one.

    Raises:
        ValueError: on shape mismatch, an empty table, or centroids not sorted ascending.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, N], got shape {tuple(values.shape)}")
    if centroids.dim() == 2:
        if centroids.shape[0] != values.shape[0]:
            raise ValueError(
                f"centroids have {centroids.shape[0]} rows but values have {values.shape[0]}"
            )
    elif centroids.dim() != 1:
        raise ValueError(f"centroids must be [B, k] or [k], got shape {tuple(centroids.shape)}")
    if centroids.shape[-1] == 0:
        raise ValueError("centroids must contain at least one entry")
    if bool((centroids[..., 1:] < centroids[..., :-1]).any()):
        raise ValueError("centroids must be sorted ascending along the last dimension")
    dtype = torch.promote_types(torch.promote_types(values.dtype, centroids.dtype), torch.float32)
    c = centroids.to(device=values.device, dtype=dtype)
    return _nearest(values.to(dtype), c)


def weighted_sse(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    centroids: torch.Tensor,
    assignments: torch.Tensor,
) -> torch.Tensor:
    """Per-row objective ``sum_n w_n * (v_n - centroids[a_n])**2``, shape ``[B]``, float64.

    ``weights`` follows :func:`weighted_kmeans_1d` (``[B, N]``, ``[N]`` or ``None``; all-zero
    rows count as uniform), so this is exactly the quantity that function minimises.  The sum is
    accumulated and returned in float64 so that nearly equal errors can be compared.
    """
    v = _check_values(values)
    w = _prepare_weights(weights, v)
    if centroids.dim() != 2 or centroids.shape[0] != v.shape[0]:
        raise ValueError(
            f"centroids must be [B, k] with B={v.shape[0]}, got shape {tuple(centroids.shape)}"
        )
    if assignments.shape != v.shape:
        raise ValueError(
            f"assignments must have shape {tuple(v.shape)}, got {tuple(assignments.shape)}"
        )
    return _sse(v, w, centroids.to(v.device), assignments.to(device=v.device, dtype=torch.int64))


def _sse(v: torch.Tensor, w: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    q = c.double().gather(1, a)
    return ((v.double() - q) ** 2 * w.double()).sum(dim=1)


def _init_quantile(runs: _Runs, k: int) -> torch.Tensor:
    """Centroids at the weighted ``(i + 0.5) / k`` quantiles of each row (inverse CDF)."""
    cw = runs.pw  # cumulative weight of the sorted row, after a leading 0
    frac = (torch.arange(k, device=cw.device, dtype=torch.float64) + 0.5) / k
    targets = frac.unsqueeze(0) * cw[:, -1:]  # > 0: every row has some weight
    idx = torch.searchsorted(cw, targets.contiguous(), side="left") - 1
    return runs.sorted.gather(1, idx.clamp_(max=cw.shape[1] - 2))


def _init_companded(runs: _Runs, k: int) -> torch.Tensor:
    """Centroids at equal steps of ``∫ p(x)^(1/3) dx`` over each sorted row.

    At high rate the MSE-optimal point density of a scalar quantizer is proportional to
    ``p(x)^(1/3)`` (Panter & Dite 1951), not to ``p(x)`` as the plain quantiles are: the
    tails get more entries than their share of values.  Between consecutive sorted values
    ``x_i < x_{i+1}`` the density is taken as ``w_i / gap``, so the stretch adds
    ``w_i^(1/3) * gap^(2/3)``; centroids are interpolated inside the gaps.  On smollm2-135m's
    weight columns, Lloyd from here ended 0.95-1.17x the error of Lloyd-from-quantiles plus
    the boundary search, in a tenth of the time at 5-8 bits, and with the search 0-25 %
    below it (benchmarks/results/kmeans-smollm2-135m.md).
    """
    sv = runs.sorted.double()
    gaps = sv[:, 1:] - sv[:, :-1]
    density = runs.weights[:, :-1] ** (1 / 3) * gaps ** (2 / 3)
    cum = torch.cat([torch.zeros_like(density[:, :1]), density.cumsum(dim=1)], dim=1)
    frac = (torch.arange(k, device=sv.device, dtype=torch.float64) + 0.5) / k
    targets = (frac.unsqueeze(0) * cum[:, -1:]).contiguous()
    upper = torch.searchsorted(cum, targets, side="left").clamp_(1, sv.shape[1] - 1)
    low, high = cum.gather(1, upper - 1), cum.gather(1, upper)
    t = ((targets - low) / (high - low).clamp_min(1e-300)).clamp_(0, 1)
    left = sv.gather(1, upper - 1)
    return (left + t * (sv.gather(1, upper) - left)).to(torch.float32).sort(dim=1).values


def _init_kmeanspp(v: torch.Tensor, w: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Weighted k-means++: sample the next seed with probability proportional to w * D^2."""
    gen = torch.Generator(device=v.device)
    gen.manual_seed(seed)
    idx = torch.multinomial(w, 1, generator=gen)
    first = v.gather(1, idx)
    chosen = [first]
    d2 = (v - first) ** 2
    for _ in range(1, k):
        p = w * d2
        # A row whose values all coincide with chosen seeds has p == 0; fall back to w so that
        # sampling stays defined (it repeats a value, and Lloyd's re-seeding handles the rest).
        p = torch.where(p.sum(dim=1, keepdim=True) > 0, p, w)
        idx = torch.multinomial(p, 1, generator=gen)
        c = v.gather(1, idx)
        chosen.append(c)
        d2 = torch.minimum(d2, (v - c) ** 2)
    return torch.cat(chosen, dim=1).sort(dim=1).values


def weighted_kmeans_1d(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    *,
    iters: int = 30,
    tol: float = 1e-6,
    init: str | torch.Tensor = "companded",
    seed: int = 0,
    refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means on every row of ``values`` independently, all rows at once.

    Minimises ``sum_n w_n * (v_n - c[a_n])**2`` per row by Lloyd's iterations from ``init``,
    then (``refine``) a local search over contiguous partitions and a final Lloyd polish.

    Args:
        values: ``[B, N]`` real tensor; each row is one problem.  Computed in float32.
        weights: ``[B, N]``, ``[N]`` (shared by all rows) or ``None`` (uniform); non-negative.
            A row whose weights are all zero is treated as uniformly weighted.
        k: number of centroids per row (``>= 1``).
        iters: maximum number of Lloyd iterations per Lloyd phase, and of refinement rounds.
        tol: stop once no centroid moved by more than ``tol`` times its row's value range.
        init: ``"companded"`` (deterministic, the default: equal steps of the high-rate
            optimal point density, ``p(x)^(1/3)``, see :func:`_init_companded`),
            ``"quantile"`` (deterministic: weighted quantiles ``(i + 0.5) / k``),
            ``"kmeans++"`` (weighted k-means++ seeded by ``torch.Generator().manual_seed(seed)``),
            or a ``[B, k]`` tensor of starting centroids (a warm start).
        seed: seed for ``"kmeans++"``; ignored by the deterministic inits.
        refine: after Lloyd, search over partitions of the sorted row
            (:func:`_refine_boundaries`), then polish with Lloyd again; per row the better of
            this and plain Lloyd is kept, so it is never worse.  ``False`` gives plain Lloyd
            (3-20x faster; from the default seeds 0-40 % above the search's error on
            smollm2-135m's weight columns, from quantile seeds up to 90x above).

    Returns:
        ``(centroids, assignments)``: float32 ``[B, k]`` sorted ascending along each row, and
        int64 ``[B, N]`` nearest-centroid indices in ``[0, k)``.  When ``N <= k`` the centroids
        are the row's sorted values padded by repeating the largest, so the error is zero.
        A row with fewer than ``k`` distinct values ends with duplicate centroids.

    The result is a local optimum (exact when ``N <= k``, and for ``k <= 2`` with ``refine`` and
    ``iters >= 1``), deterministic for fixed inputs, ``init`` and ``seed`` on a given device.

    Raises:
        ValueError: bad ``k``, ``init`` or ``iters``; non-2-D, empty-row or non-finite
            ``values``; weights of the wrong shape, negative or non-finite.
    """
    return weighted_kmeans_1d_each(
        values, weights, [k], iters=iters, tol=tol, init=init, seed=seed, refine=refine
    )[0]


def weighted_kmeans_1d_each(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    ks: list[int],
    *,
    iters: int = 30,
    tol: float = 1e-6,
    init: str | torch.Tensor = "companded",
    seed: int = 0,
    refine: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`weighted_kmeans_1d` for each ``k`` in ``ks``, sorting the rows only once."""
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(init, torch.Tensor) and init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if iters < 0:
        raise ValueError(f"iters must be non-negative, got {iters}")
    v = _check_values(values)
    B, N = v.shape
    if N == 0:
        raise ValueError("values must have at least one column")
    w = _prepare_weights(weights, v)
    chunks = row_chunks(B, N)
    if len(chunks) > 1 and not (isinstance(init, str) and init == "kmeans++"):
        # rows are independent problems (deterministic inits, per-row convergence):
        # a chunk of rows at a time bounds the temporaries, with the same results
        fits = [
            weighted_kmeans_1d_each(
                v[rows],
                w[rows],
                ks,
                iters=iters,
                tol=tol,
                seed=seed,
                refine=refine,
                init=init[rows] if isinstance(init, torch.Tensor) else init,
            )  # fmt: skip
            for rows in chunks
        ]
        return [
            (torch.cat([f[i][0] for f in fits]), torch.cat([f[i][1] for f in fits]))
            for i in range(len(ks))
        ]
    runs = _Runs(v, w) if B > 0 and any(N > k for k in ks) else None
    return [_fit(v, w, runs, k, iters, tol, init, seed, refine) for k in ks]


CHUNK_VALUES = 1 << 20  # values per chunk of rows: the fits' temporaries take ~100 bytes each


def row_chunks(rows: int, columns: int) -> list[slice]:
    """Slices of at most :data:`CHUNK_VALUES` values' worth of rows (at least one row)."""
    size = max(1, CHUNK_VALUES // max(columns, 1))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _fit(v, w, runs, k, iters, tol, init, seed, refine) -> tuple[torch.Tensor, torch.Tensor]:
    """One k-means problem per row of ``v`` (checked), with ``runs`` its sorted prefix sums."""
    B, N = v.shape
    if N <= k:
        sv = v.sort(dim=1).values
        c = torch.cat([sv, sv[:, -1:].expand(B, k - N)], dim=1)
        return c, _nearest(v, c)
    if B == 0:
        return v.new_empty(0, k), torch.empty(0, N, dtype=torch.int64, device=v.device)

    if isinstance(init, torch.Tensor):  # warm start, e.g. refitting after removing outliers
        if init.shape != (B, k):
            raise ValueError(f"initial centroids must have shape {[B, k]}, got {list(init.shape)}")
        c = init.to(device=v.device, dtype=torch.float32).sort(dim=1).values
    elif init == "companded":
        c = _init_companded(runs, k)
    elif init == "quantile":
        c = _init_quantile(runs, k)
    else:
        c = _init_kmeanspp(v, w, k, seed)
    span = runs.sorted[:, -1] - runs.sorted[:, 0]
    scale = torch.where(span > 0, span, torch.ones_like(span))
    c = _lloyd(runs, c, k, iters, tol, scale)
    a = _nearest(v, c)
    if refine and k > 1 and iters > 0:
        c_ref = _lloyd(runs, _refine_boundaries(runs, c, k, iters), k, iters, tol, scale)
        a_ref = _nearest(v, c_ref)
        # The search lowers the exact objective, but the float32 centroids it ends with can, on
        # rows far from zero with tiny spread, round worse than Lloyd's; keep the better per row.
        better = _sse(v, w, c_ref, a_ref) <= _sse(v, w, c, a)
        c = torch.where(better.unsqueeze(1), c_ref, c)
        a = torch.where(better.unsqueeze(1), a_ref, a)
    return c, a


def _lloyd(
    runs: _Runs,
    c: torch.Tensor,
    k: int,
    iters: int,
    tol: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Weighted Lloyd iterations from sorted centroids ``c``; returns sorted centroids.

    A cluster is the run of sorted values between two midpoints (a value exactly on a
    midpoint goes to the lower centroid, as in :func:`nearest_centroid`), and its new
    centroid is the run's weighted mean, both read from ``runs``' prefix sums.
    Convergence is per row: a row stops (and is dropped from later iterations) once none of its
    centroids moved by more than ``tol * scale``.  So a row's result does not depend on the
    other rows in the batch, and converged rows cost nothing.
    """
    c = c.clone()
    live = torch.arange(c.shape[0], device=c.device)
    sub, cl, sl = runs, c, scale
    for _ in range(iters):
        bounds = _run_bounds(sub.sorted, cl)
        weight = sub.pw.gather(1, bounds[:, 1:]) - sub.pw.gather(1, bounds[:, :-1])
        total = sub.ps.gather(1, bounds[:, 1:]) - sub.ps.gather(1, bounds[:, :-1])
        nonempty = weight > 0
        means = (sub.mu + total / torch.where(nonempty, weight, 1.0)).to(torch.float32)
        new_c = torch.where(nonempty, means, cl)
        empty = ~nonempty
        if bool(empty.any()):
            new_c = _reseed_empty(sub, _nearest(sub.sorted, cl), new_c, empty, k)
        new_c = new_c.sort(dim=1).values
        going = (new_c - cl).abs().amax(dim=1) > tol * sl
        c[live] = new_c
        if not bool(going.all()):
            live = live[going]
            if live.numel() == 0:
                break
            sub, sl = runs.take(live), scale[live]
            new_c = new_c[going]
        cl = new_c
    return c


def _run_bounds(sorted_values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[B, k+1]`` positions in each sorted row where each centroid's cluster starts (and N)."""
    B, N = sorted_values.shape
    mids = (c[:, :-1] * 0.5 + c[:, 1:] * 0.5).contiguous()
    return torch.cat(
        [
            torch.zeros(B, 1, dtype=torch.int64, device=c.device),
            torch.searchsorted(sorted_values, mids, side="right"),
            torch.full((B, 1), N, dtype=torch.int64, device=c.device),
        ],
        dim=1,
    )


class _Runs:
    """Prefix sums over each row's sorted values, for O(1) scores of contiguous runs.

    A run ``[i, j)`` with weight ``W = sum w``, ``S = sum w x`` and ``Q = sum w x^2`` costs
    ``Q - S^2 / W`` (its weighted SSE about its own mean).  Within a fixed stretch of the sorted
    row, ``Q`` is the same however the stretch is cut into runs, so comparing cuts only needs
    the *fit* ``S^2 / W`` summed over runs (larger fit = lower cost).  Values are centred on the
    row mean and summed in float64 to keep these differences accurate.
    """

    def __init__(self, v: torch.Tensor, w: torch.Tensor) -> None:
        B, N = v.shape
        sv, order = v.sort(dim=1)
        wd = w.gather(1, order).double()
        self.sorted = sv
        self.weights = wd
        self.mu = (wd * sv.double()).sum(dim=1, keepdim=True) / wd.sum(dim=1, keepdim=True)
        x = sv.double() - self.mu
        zero = torch.zeros(B, 1, dtype=torch.float64, device=v.device)
        # Prefix sums of non-negative terms are non-decreasing, so run weights are >= 0, and a
        # run of zero-weight values has W == S == 0 exactly (its fit S^2 / max(W, tiny) is 0).
        self.pw = torch.cat([zero, wd.cumsum(dim=1)], dim=1)
        self.ps = torch.cat([zero, (wd * x).cumsum(dim=1)], dim=1)
        self.total = (wd * x * x).sum(dim=1, keepdim=True)  # cost with a single run

    def take(self, rows: torch.Tensor) -> _Runs:
        """The same structure restricted to ``rows`` (so converged rows stop costing time)."""
        sub = _Runs.__new__(_Runs)
        sub.sorted, sub.weights, sub.mu, sub.pw, sub.ps, sub.total = (
            t[rows] for t in (self.sorted, self.weights, self.mu, self.pw, self.ps, self.total)
        )
        return sub

    @property
    def pos(self) -> torch.Tensor:
        """``[B, N]``: every row is ``0..N-1`` (built when the boundary search first needs it)."""
        if getattr(self, "_pos", None) is None:
            B, N = self.sorted.shape
            self._pos = torch.arange(N, device=self.sorted.device).expand(B, N).contiguous()
        return self._pos

    def fit(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``S^2 / W`` of runs ``[i, j)`` (0 for empty or zero-weight runs)."""
        sw = self.pw.gather(1, j) - self.pw.gather(1, i)
        s = self.ps.gather(1, j) - self.ps.gather(1, i)
        return s * s / sw.clamp_min(1e-300)

    def best_split(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best way to cut each run between consecutive ``bounds`` ([B, S+1]) in two.

        Returns the largest ``fit(lo, p) + fit(p, hi)`` over ``lo <= p < hi`` and the smallest
        ``p`` attaining it, both [B, S]; a run with no position gets ``-inf`` and ``N``.
        """
        pos = self.pos
        B, N = pos.shape
        nseg = bounds.shape[1] - 1
        dev = bounds.device
        m = (torch.searchsorted(bounds, pos, side="right") - 1).clamp_(0, nseg - 1)
        bw, bs = self.pw.gather(1, bounds), self.ps.gather(1, bounds)  # [B, S+1], small
        pw, ps = self.pw[:, :N], self.ps[:, :N]
        w1, s1 = pw - bw.gather(1, m), ps - bs.gather(1, m)
        w2, s2 = bw.gather(1, m + 1) - pw, bs.gather(1, m + 1) - ps
        cand = s1 * s1 / w1.clamp_min(1e-300) + s2 * s2 / w2.clamp_min(1e-300)
        best = torch.full((B, nseg), -float("inf"), dtype=torch.float64, device=dev)
        best.scatter_reduce_(1, m, cand, reduce="amax")
        hit = cand == best.gather(1, m)
        best_pos = torch.full((B, nseg), N, dtype=torch.int64, device=dev)
        best_pos.scatter_reduce_(1, m, torch.where(hit, pos, N), reduce="amin")
        return best, best_pos


def _descend(runs: _Runs, b: torch.Tensor, k: int, sweeps: int) -> torch.Tensor:
    """Exact coordinate descent on the inner boundaries ``b[:, 1:k]``; returns the new ``b``.

    Holding ``b_{j-1}`` and ``b_{j+1}`` fixed, the best ``b_j`` is found exactly by scoring every
    position in between.  Odd boundaries are independent given the even ones and vice versa, so
    each half-sweep moves all of them at once, in all rows.  A boundary moves only on strict
    improvement, so the objective decreases monotonically; a row whose full sweep moved nothing
    is at a coordinate-wise optimum and is dropped from later sweeps.
    """
    b = b.clone()
    live = torch.arange(b.shape[0], device=b.device)
    plans = []
    for parity in (1, 2):
        active = list(range(parity, k, 2))
        if active:
            fixed = [i for i in range(k + 1) if i not in active]
            # Run m between fixed boundaries holds active boundary j iff fixed[m] == j - 1.
            seg = torch.tensor([fixed.index(j - 1) for j in active], device=b.device)
            plans.append((torch.tensor(active, device=b.device), fixed, seg))
    sub = runs
    for _ in range(sweeps):
        if live.numel() == 0:
            break
        if live.numel() < b.shape[0]:
            sub = runs.take(live)
        bl = b[live]
        moved = torch.zeros(live.numel(), dtype=torch.bool, device=b.device)
        for act, fixed, seg in plans:
            best, best_pos = sub.best_split(bl[:, fixed].contiguous())
            bj = bl[:, act]
            cur = sub.fit(bl[:, act - 1], bj) + sub.fit(bj, bl[:, act + 1])
            move = best[:, seg] > cur
            bl[:, act] = torch.where(move, best_pos[:, seg], bj)
            moved |= move.any(dim=1)
        b[live] = bl
        live = live[moved]
    return b


def _merge_split(runs: _Runs, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two adjacent runs and split another one, in rows where that lowers the cost.

    Coordinate descent cannot leave a partition where, say, an outlier shares a run with the
    bulk while two runs elsewhere split a tight group: fixing that moves two boundaries at once.
    Per row we try (a) the best split paired with the cheapest merge not touching it, and (b)
    the cheapest merge paired with the best split of a run it does not touch, and apply the
    better if it strictly helps.  Returns the new ``b`` and a per-row "changed" mask.  ``k >= 3``.
    """
    run_fit = runs.fit(b[:, :-1], b[:, 1:])  # [B, k]
    split_fit, split_pos = runs.best_split(b.contiguous())
    gain = split_fit - run_fit  # >= 0 up to rounding; -inf where a run cannot be cut
    # loss[:, j-1]: merging runs j-1 and j (dropping boundary b_j), j = 1..k-1
    loss = run_fit[:, :-1] + run_fit[:, 1:] - runs.fit(b[:, :-2], b[:, 2:])
    run_idx = torch.arange(k, device=b.device)
    pair_idx = torch.arange(1, k, device=b.device)
    inf = float("inf")

    r_a = gain.argmax(dim=1, keepdim=True)
    loss_a = torch.where((pair_idx == r_a) | (pair_idx - 1 == r_a), inf, loss)
    j_a = loss_a.argmin(dim=1, keepdim=True)
    net_a = gain.gather(1, r_a) - loss_a.gather(1, j_a)

    j_b = loss.argmin(dim=1, keepdim=True)
    gain_b = torch.where((run_idx == j_b) | (run_idx == j_b + 1), -inf, gain)
    r_b = gain_b.argmax(dim=1, keepdim=True)
    net_b = gain_b.gather(1, r_b) - loss.gather(1, j_b)

    use_a = net_a >= net_b
    r = torch.where(use_a, r_a, r_b)
    j = torch.where(use_a, j_a, j_b)  # column of the inner boundaries b[:, 1:k] to replace
    net = torch.where(use_a, net_a, net_b)
    # Strict and slightly relative, so rounding noise cannot make the search cycle.
    apply = net > 1e-12 * runs.total
    inner = b[:, 1:k].scatter(1, j, split_pos.gather(1, r)).sort(dim=1).values
    b = b.clone()
    b[:, 1:k] = torch.where(apply, inner, b[:, 1:k])
    return b, apply.squeeze(1)


_MAX_SWEEPS = 100  # cap on coordinate-descent sweeps per round (rows usually settle in < 20)


def _refine_boundaries(runs: _Runs, c: torch.Tensor, k: int, rounds: int) -> torch.Tensor:
    """Local search over partitions of the sorted values into k contiguous runs.

    In 1-D the optimal clusters are contiguous runs of the sorted values, described by
    boundaries ``0 = b_0 <= ... <= b_k = N``; run costs are O(1) from prefix sums.  Starting from
    Lloyd's partition we alternate exact coordinate descent on single boundaries
    (:func:`_descend`) with merge-one-split-another moves (:func:`_merge_split`), for at most
    ``rounds`` rounds, each time only on rows that are still improving.  Every move strictly
    lowers the objective.

    Lloyd's fixed points can be poor when a few values carry most of the weight (a heavy value
    sits just on the wrong side of a midpoint and holds it there) or when quantile seeds all
    land in the bulk of a heavy-tailed row; this escapes most of those, and for ``k = 2`` it
    gives the exact optimum.  Returns sorted float32 centroids (the run means; empty runs keep
    their old centroid for Lloyd's re-seeding to handle).
    """
    B = c.shape[0]
    b = _run_bounds(runs.sorted, c)
    live = torch.arange(B, device=c.device)
    for _ in range(rounds):
        sub = runs if live.numel() == B else runs.take(live)
        bl = _descend(sub, b[live], k, _MAX_SWEEPS)
        if k >= 3:
            bl, changed = _merge_split(sub, bl, k)
        b[live] = bl
        if k < 3:
            break
        live = live[changed]
        if live.numel() == 0:
            break

    run_w = runs.pw.gather(1, b[:, 1:]) - runs.pw.gather(1, b[:, :-1])
    run_s = runs.ps.gather(1, b[:, 1:]) - runs.ps.gather(1, b[:, :-1])
    nonempty = run_w > 0
    means = (runs.mu + run_s / torch.where(nonempty, run_w, 1.0)).to(torch.float32)
    return torch.where(nonempty, means, c).sort(dim=1).values


def _reseed_empty(
    runs: _Runs, a: torch.Tensor, c: torch.Tensor, empty: torch.Tensor, k: int
) -> torch.Tensor:
    """Move the r-th empty centroid of each row onto the row's r-th largest-error value.

    Errors are ``w * (v - c[a])**2`` for the sorted values ``v``, their clusters ``a`` and the
    updated centroids ``c``.  Rows whose candidate error is zero (every value already exactly
    represented) keep the stale centroid.  Requires ``k <= N``.
    """
    v, w = runs.sorted, runs.weights.float()
    err = w * (v - c.gather(1, a)) ** 2
    top_err, top_idx = err.topk(k, dim=1)
    rank = (empty.cumsum(dim=1) - 1).clamp_(min=0)
    cand = v.gather(1, top_idx).gather(1, rank)
    cand_err = top_err.gather(1, rank)
    return torch.where(empty & (cand_err > 0), cand, c)
