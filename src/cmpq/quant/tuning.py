"""Tuned look-up tables: the codes stay fixed, the fp16 tables move.

A quantized linear's tables are a few percent of its stored bits; once its codes
are chosen, the tables can be refit by gradient steps to what the model needs,
at no cost in storage. Two passes use this (docs/decisions.md):

* :func:`tune_block_tables`: after a block is quantized, its tables are fit to
  the full-precision block's outputs on the calibration inputs (mean squared
  error relative to the outputs' energy), one window per step; tables
  that do not lower the error on the windows checked are put back as they were.
* :func:`tune_model_tables`: all tables of a quantized model at once, to the
  full-precision model's next-token distribution (per-token KL), one
  calibration window per step; the full-precision model is remembered by its last
  hidden states on those windows (:func:`teacher_states`), not by a copy. The KL
  is checked on calibration windows held out of the steps, before and after:
  tables that do not lower it are put back as they were. Optionally the model's
  norm weights move with them (:func:`norm_parameters`), stored in fp16 as before,
  and the fp16 outlier values (each linear's, by :class:`TunableLinear`'s
  ``outliers``), stored as before too.

While tuning, each :class:`~cmpq.runtime.qlinear.QuantizedLinear` is swapped for
a :class:`TunableLinear` whose weight is rebuilt from its float32 tables on every
forward; afterwards the tables are rounded to fp16 and written back: the stored
tensors keep their shapes, dtypes and bits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calib.looper import block_device, map_tensors, run_block, windows_per_forward
from ..config import GAP_TUNE_MODEL_LR, RELATIVE_TUNE_MODEL_LR
from ..errors import CmpqError
from ..format.layer import group_tables, table_positions
from ..models.graph import replace_module
from ..runtime.qlinear import QuantizedLinear, quantized_layers

CHECK_WINDOWS = 16  # calibration windows the block's error is checked on, before and after
WINDOWS_PER_STEP = 1  # calibration windows per step of block tuning
HELD_OUT_WINDOWS = 2  # calibration windows model tuning checks on and never steps on


class _TableLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with the weight rebuilt from ``table`` and the
    outlier values ``outliers`` by ``tunable``, saving only ``x``, the table and the
    outliers for the backward pass, which rebuilds
    the weight again: between forward and backward a linear holds no float32 weight
    (with autograd's own ``take``, 12 bytes a weight with its int64 index). The
    tables' gradient is summed per entry by ``bincount``: the same sums as
    ``take``'s accumulating scatter, about ten times faster on the CPU (1 ms against
    11 ms for a 1536 x 576 weight, where that scatter took about 40 % of a step)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, table: torch.Tensor, outliers: torch.Tensor, tunable: TunableLinear
    ):
        ctx.tunable = tunable
        ctx.save_for_backward(x, table, outliers)
        return F.linear(x, tunable.rebuild(table, outliers), tunable.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, table, outliers = ctx.saved_tensors
        tunable = ctx.tunable
        grad_x = grad @ tunable.rebuild(table, outliers) if ctx.needs_input_grad[0] else None
        grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_outliers = None
        if outliers.numel():  # outliers are stored apart: no table entry
            if ctx.needs_input_grad[2]:
                grad_outliers = grad_weight[tunable.outlier_rows, tunable.outlier_cols]
            grad_weight[tunable.outlier_rows, tunable.outlier_cols] = 0
        flat = grad_weight.reshape(-1)
        grad_table = torch.bincount(tunable.positions, flat, minlength=table.numel())
        if tunable.scale is not None:  # the parameter is in units of each entry's scale
            grad_table = grad_table * tunable.scale
        return grad_x, grad_table.to(table.dtype), grad_outliers, None


class TunableLinear(nn.Module):
    """A quantized linear whose tables are a float32 parameter; the weight is
    ``table[positions]`` with the outliers in place, rebuilt on every forward (and
    again in the backward pass: :class:`_TableLinear`). ``positions`` (each weight's
    entry, ``column_base + row * row_stride + codes``, flat int32: 4 bytes a weight)
    is computed once: rebuilding it from the codes on every rebuild took longer
    than the gather itself.

    With ``by_gaps``, the parameter is each entry in units of its own
    :func:`entry_gaps` (the table is ``table * scale``), so one learning rate moves
    every entry by the same share of the gaps around it: Adam steps each parameter
    by about the rate, whatever its gradient's size. With ``tune_outliers``, the fp16
    outlier values are a float32 parameter too (``outliers``); else a buffer."""

    def __init__(
        self, quantized: QuantizedLinear, by_gaps: bool = False, tune_outliers: bool = False
    ) -> None:
        super().__init__()
        layer = quantized.layer()
        device = quantized.lut.device
        codes, column_base, row_stride = table_positions(layer)
        rows = torch.arange(codes.shape[0])[:, None]
        positions = column_base + rows * row_stride + codes.long()
        self.shape = tuple(codes.shape)
        # int32: a layer's tables hold far fewer than 2**31 entries
        self.register_buffer("positions", positions.reshape(-1).to(device, torch.int32))
        self.register_buffer("outlier_rows", layer.outlier_rows.to(device))
        self.register_buffer("outlier_cols", layer.outlier_cols.to(device))
        values = layer.outlier_values.float().to(device)  # in the stored (CSR) order
        if tune_outliers:
            self.outliers = nn.Parameter(values)
        else:
            self.register_buffer("outliers", values)
        lut = quantized.lut.detach().float()
        self.scale = entry_gaps(lut, layer).to(device) if by_gaps else None
        self.table = nn.Parameter(lut.clone() if self.scale is None else lut / self.scale)
        self.bias = None if quantized.bias is None else quantized.bias.detach().float()

    def values(self, table: torch.Tensor) -> torch.Tensor:
        """The table entries ``table`` (this linear's parameter, or values for it) stand for."""
        return table if self.scale is None else table * self.scale

    def rebuild(self, table: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
        """The weight from ``table`` (this linear's, or values for it) with the outlier
        values ``outliers`` in place."""
        weight = self.values(table).index_select(0, self.positions).view(self.shape)
        if outliers.numel():
            weight = weight.index_put((self.outlier_rows, self.outlier_cols), outliers)
        return weight

    def weight(self) -> torch.Tensor:
        """The weight as the tables and outliers stand now (no gradient)."""
        with torch.no_grad():
            return self.rebuild(self.table, self.outliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TableLinear.apply(x.float(), self.table, self.outliers, self).to(x.dtype)

    def fp16_table(self) -> torch.Tensor:
        return self.values(self.table.detach()).half()


def entry_gaps(lut: torch.Tensor, layer) -> torch.Tensor:
    """Each entry of ``lut`` (flat, float32; ``layer``'s tables) measured by its
    neighbours in its own table: the mean of the gaps to the next entry below and
    above (the one gap at either end), flat like ``lut``. A table gets finer with
    every bit, so this is how far an entry can move before it takes a neighbour's
    place. Never zero (tied entries get a thousandth of the table's mean gap)."""
    out = torch.empty_like(lut)
    views = group_tables(out, layer.layout, layer.out_features, layer.group_bits, layer.group_sizes)
    entries = group_tables(
        lut, layer.layout, layer.out_features, layer.group_bits, layer.group_sizes
    )
    for view, tables in zip(views, entries, strict=True):
        ordered, order = tables.sort(dim=1)
        steps = ordered.diff(dim=1)
        gaps = (torch.cat([steps[:, :1], steps], 1) + torch.cat([steps, steps[:, -1:]], 1)) / 2
        floor = steps.mean(dim=1, keepdim=True).clamp_min(1e-12) * 1e-3
        view.scatter_(1, order, torch.maximum(gaps, floor))
    return out


@contextmanager
def tunable_tables(module: nn.Module, by_gaps: bool = False, tune_outliers: bool = False):
    """``module``'s quantized linears swapped for :class:`TunableLinear` ones (yields
    them by name); on exit the originals are back, holding the tuned tables (and
    outlier values) in fp16."""
    originals = quantized_layers(module)
    tunables = {name: TunableLinear(q, by_gaps, tune_outliers) for name, q in originals.items()}
    for name, tunable in tunables.items():
        replace_module(module, name, tunable)
    try:
        yield tunables
    finally:
        for name, quantized in originals.items():
            tunable = tunables[name]
            quantized.lut = tunable.fp16_table()  # new tensors: cached views rebuild
            if tune_outliers and tunable.outliers.numel():
                quantized.outlier_values = tunable.outliers.detach().half()
            replace_module(module, name, quantized)


def round_tables(tunables: dict[str, TunableLinear]) -> None:
    """Each table (and tuned outlier value) rounded to the fp16 value it will be
    stored as."""
    with torch.no_grad():
        for tunable in tunables.values():
            stored = tunable.values(tunable.table).half().float()
            tunable.table.copy_(stored if tunable.scale is None else stored / tunable.scale)
            tunable.outliers.copy_(tunable.outliers.half().float())


def tables(tunables: dict[str, TunableLinear]) -> dict[str, nn.Parameter]:
    """Each linear's table parameter, by the linear's name."""
    return {name: tunable.table for name, tunable in tunables.items()}


def outlier_parameters(tunables: dict[str, TunableLinear]) -> dict[str, nn.Parameter]:
    """Each linear's outlier values, where they are a parameter and there are any, by
    ``<linear's name>.outliers``."""
    return {
        f"{name}.outliers": tunable.outliers
        for name, tunable in tunables.items()
        if isinstance(tunable.outliers, nn.Parameter) and tunable.outliers.numel()
    }


def copies(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter as it stands, to put back with :func:`restore`."""
    return {name: parameter.detach().clone() for name, parameter in parameters.items()}


def restore(parameters: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Each parameter put back to its copy in ``saved`` (from :func:`copies`)."""
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name])


@dataclass(frozen=True)
class BlockTuning:
    """A block's relative output error before and after tuning, on the windows checked;
    ``kept``: whether the tuned tables were kept (they lowered it)."""

    before: float
    after: float
    kept: bool


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().sum() / target.square().sum().clamp_min(1e-30)


def tune_block_tables(
    block: nn.Module,
    hidden: list[torch.Tensor],
    kwargs: dict,
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
) -> BlockTuning:
    """Fit ``block``'s tables (its linears already quantized) so its output on each
    window of ``hidden`` comes closer to ``targets`` (the full-precision block's).

    Each step takes the next :data:`WINDOWS_PER_STEP` windows (cycling); Adam with a
    cosine decay of ``lr``. The error is checked on the first
    :data:`CHECK_WINDOWS` windows with the fp16 tables before and after: tables that
    did not lower it are restored.
    """
    device = block_device(block)
    # calibration records its inputs in inference mode; such tensors cannot take part
    # in a backward pass, so each is cloned outside it
    kwargs = map_tensors(kwargs, lambda tensor: tensor.to(device).clone())
    size = windows_per_forward(block, hidden[0].shape[-2])
    checked = range(min(CHECK_WINDOWS, len(hidden)))

    def batch(indices) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([hidden[i] for i in indices]).to(device, torch.float32)
        t = torch.cat([targets[i] for i in indices]).to(device, torch.float32)
        return x, t

    def check_error() -> float:
        total = energy = 0.0
        with torch.no_grad():
            for start in range(0, len(checked), size):
                x, t = batch(checked[start : start + size])
                y = run_block(block, x, kwargs)
                total += float((y - t).square().sum())
                energy += float(t.square().sum())
        return total / max(energy, 1e-30)

    with tunable_tables(block) as tunables:
        saved = copies(tables(tunables))
        before = check_error()
        parameters = [t.table for t in tunables.values()]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(steps))
        for step in range(steps):
            start = (step * WINDOWS_PER_STEP) % len(hidden)
            x, t = batch(range(start, min(start + WINDOWS_PER_STEP, len(hidden))))
            loss = relative_error(run_block(block, x, kwargs), t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        round_tables(tunables)
        after = check_error()
        kept = after < before
        if not kept:
            restore(tables(tunables), saved)
    return BlockTuning(before, after, kept)


def cosine(steps: int):
    """A learning-rate factor falling from 1 to 0 along half a cosine over ``steps``."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


@dataclass(frozen=True)
class ModelTuning:
    """Mean per-token KL to the full-precision model over the first and the last
    tenth of the steps (on different windows: a trend, not a check), and on the
    held-out windows before and after tuning (the check); ``kept``: whether the tuned
    tables were kept (they lowered the held-out KL, or no window was held out)."""

    first_kl: float
    last_kl: float
    steps: int
    held_out_before: float | None = None
    held_out_after: float | None = None
    kept: bool = True
    norm_weights: int = 0  # norm weights tuned with the tables (0: tables only)
    outlier_values: int = 0  # outlier values tuned with the tables


@dataclass
class Teacher:
    """The full-precision model's last hidden states, recorded before quantization:
    on the windows the steps use (``states[i]`` for window ``i``), and on the
    calibration windows held out of them (``held_out``, by window index)."""

    states: list[torch.Tensor]
    held_out: dict[int, torch.Tensor]


def final_states(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """``model``'s last hidden states on one window (``[seqlen]``): what its output
    head turns into logits (after the final norm)."""
    return model.base_model(window.unsqueeze(0), use_cache=False).last_hidden_state[0]


def next_token_log_probs(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token from last hidden states, through
    ``model``'s output head (whose weights are never quantized or tuned). A model
    that post-processes its logits (Gemma-2's soft-capping) is compared before
    that step, the same for teacher and student."""
    return F.log_softmax(model.get_output_embeddings()(states).float(), -1)


def relative_rates(
    tunables: dict[str, TunableLinear], share: float = RELATIVE_TUNE_MODEL_LR
) -> dict[str, float]:
    """Each linear's learning rate: ``share`` of its weight's RMS. Adam moves every
    entry by about the rate a step, so a rate relative to the weights' scale moves
    each table by the same share on every model (weights ~0.19 RMS on smollm2-135m,
    ~0.04 on gemma3-270m)."""
    return {
        name: share * float(tunable.weight().square().mean().sqrt())
        for name, tunable in tunables.items()
    }


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights (and biases) of ``model``'s normalisation layers (RMSNorm,
    LayerNorm: any module whose class name ends in ``Norm``), by name. They are
    never quantized; the checkpoint stores them in fp16."""
    return {
        f"{module_name}.{name}": parameter
        for module_name, module in model.named_modules()
        if type(module).__name__.endswith("Norm")
        for name, parameter in module.named_parameters(recurse=False)
    }


def parameter_rates(
    parameters: dict[str, nn.Parameter], share: float = RELATIVE_TUNE_MODEL_LR
) -> dict[str, float]:
    """Each parameter's learning rate: ``share`` of its RMS, as :func:`relative_rates`
    gives the tables (norm weights: RMS ~0.3 on smollm2-135m, ~1-120 on gemma3-270m,
    whose norms scale by one plus the weight)."""
    return {
        name: share * float(parameter.detach().float().square().mean().sqrt().clamp_min(1e-3))
        for name, parameter in parameters.items()
    }


def held_out_windows(count: int, steps: int) -> tuple[range, range]:
    """Of ``count`` calibration windows, those model tuning's ``steps`` step on (the
    first ones, cycling when there are fewer) and those it checks on, never stepped
    on: the last :data:`HELD_OUT_WINDOWS`, or a quarter of them when few."""
    held = min(HELD_OUT_WINDOWS, count // 4)
    return range(min(steps, count - held)), range(count - held, count)


def step_windows(windows: torch.Tensor, seqlen: int | None) -> torch.Tensor:
    """The windows model tuning steps on: each of ``windows`` (int64 ``[n, length]``)
    cut into consecutive pieces of ``seqlen`` tokens, in order (``None``: as they are).
    Shorter pieces give more steps for the same tokens."""
    if seqlen is None or seqlen == windows.shape[1]:
        return windows
    if windows.shape[1] % seqlen:
        raise CmpqError(
            f"`tune_model_seqlen` {seqlen} does not divide the calibration windows' "
            f"{windows.shape[1]} tokens"
        )
    return windows.reshape(-1, seqlen)


def teacher_states(model: nn.Module, windows: torch.Tensor, steps: int) -> Teacher:
    """The full-precision ``model``'s last hidden states on the windows
    :func:`tune_model_tables` will use and check (:func:`held_out_windows`), recorded
    before quantization: the teacher then needs no copy of the model, only ``windows
    x seqlen x hidden`` float32 numbers (75 MB for 60 steps and 2 checks of 512
    tokens on smollm2-135m)."""
    stepped, held = held_out_windows(len(windows), steps)
    with torch.no_grad():
        return Teacher(
            [final_states(model, windows[i]).float() for i in stepped],
            {i: final_states(model, windows[i]).float() for i in held},
        )


def token_kl(model: nn.Module, window: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL of ``model``'s next-token distribution on ``window`` from the
    full-precision model's, given as its last hidden states there (``teacher``)."""
    with torch.no_grad():
        target = next_token_log_probs(model, teacher)
    log_probs = next_token_log_probs(model, final_states(model, window))
    return F.kl_div(log_probs, target, log_target=True, reduction="batchmean")


def held_out_kl(model: nn.Module, windows: torch.Tensor, teacher: Teacher) -> float | None:
    """Mean per-token KL on the held-out windows (``None`` when none was held out)."""
    if not teacher.held_out:
        return None
    with torch.no_grad():
        kls = [float(token_kl(model, windows[i], s)) for i, s in teacher.held_out.items()]
    return sum(kls) / len(kls)


def tune_model_tables(
    model: nn.Module,
    teacher: Teacher,
    windows: torch.Tensor,
    steps: int,
    lr: float | None,
    progress: bool = True,
    norms: bool = False,
    rate: str = "weights",
    outliers: bool = False,
) -> ModelTuning:
    """Fit every table of ``model`` (quantized) so its next-token distribution on
    ``windows`` (int64 ``[n, seqlen]``, one per step, cycling over the first
    ``len(teacher.states)``) comes closer to the full-precision model's, given as its
    last hidden states (``teacher``, from :func:`teacher_states`): Adam on the
    per-token KL, with a cosine decay of ``lr`` (``None``: by ``rate``, each
    linear's own share of its weights, :func:`relative_rates`, or with ``rate``
    "gaps" :data:`GAP_TUNE_MODEL_LR` of each entry's :func:`entry_gaps`). With
    ``norms``, the norm weights (:func:`norm_parameters`) move too, at
    :func:`parameter_rates` (or ``lr``); with ``outliers``, each linear's fp16 outlier
    values, at the linear's :func:`relative_rates` (or ``lr``). The tables (norms,
    outliers) end rounded to fp16, and are put back as they were if they did not
    lower the KL on the held-out windows."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    tuned_norms = norm_parameters(model) if norms else {}
    losses = []
    try:
        by_gaps = lr is None and rate == "gaps"
        with tunable_tables(model, by_gaps, outliers) as tunables:
            tuned_outliers = outlier_parameters(tunables)
            # linears' names, norms' weights, "<linear>.outliers"
            tuned = {**tables(tunables), **tuned_norms, **tuned_outliers}
            saved = copies(tuned)
            before = held_out_kl(model, windows, teacher)
            by_weights = relative_rates(tunables) if lr is None else dict.fromkeys(tunables, lr)
            rates = dict.fromkeys(tunables, GAP_TUNE_MODEL_LR) if by_gaps else by_weights
            groups = [{"params": [t.table], "lr": rates[n]} for n, t in tunables.items()]
            groups += [
                {"params": [tunables[n].outliers], "lr": by_weights[n]}
                for n in tunables
                if f"{n}.outliers" in tuned_outliers
            ]
            norm_rates = (
                parameter_rates(tuned_norms) if lr is None else dict.fromkeys(tuned_norms, lr)
            )
            groups += [{"params": [p], "lr": norm_rates[n]} for n, p in tuned_norms.items()]
            for parameter in tuned_norms.values():
                parameter.requires_grad_(True)
            optimizer = torch.optim.Adam(groups)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(steps))
            for step in tqdm(range(steps), desc="tune tables", unit="step", disable=not progress):
                index = step % len(teacher.states)
                loss = token_kl(model, windows[index], teacher.states[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
            round_tables(tunables)
            with torch.no_grad():
                for parameter in tuned_norms.values():
                    parameter.requires_grad_(False)
                    parameter.copy_(parameter.half().float())  # as the checkpoint stores it
            after = held_out_kl(model, windows, teacher)
            kept = before is None or after < before
            if not kept:
                restore(tuned, saved)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    tenth = max(1, len(losses) // 10)
    first = sum(losses[:tenth]) / tenth if losses else 0.0
    last = sum(losses[-tenth:]) / tenth if losses else 0.0
    count = sum(p.numel() for p in tuned_norms.values())
    outlier_count = sum(p.numel() for p in tuned_outliers.values())
    return ModelTuning(first, last, steps, before, after, kept, count, outlier_count)
