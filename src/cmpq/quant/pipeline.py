"""The public verb: ``quantize(model, config)`` transforms a model in place.

CMPQ runs in the order the data flows: calibration windows are sampled
(:mod:`cmpq.calib.text`), the block looper measures each block's linears
(:mod:`cmpq.calib.looper`), the allocation is planned (:mod:`cmpq.alloc`), and
each block's linears are quantized side by side (:mod:`.tables`,
:mod:`.feedback`, on an :mod:`.executor`) and replaced by
:class:`~cmpq.runtime.qlinear.QuantizedLinear` modules.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..alloc.budget import outlier_count, solve_budget
from ..alloc.paper import paper_allocation
from ..alloc.rd import RD_WIDTHS, rd_layer_budgets, rd_plan
from ..calib.gradients import output_gradient_energy
from ..calib.looper import (
    BlockInputs,
    BlockIO,
    BlockLoader,
    BlockWalk,
    InPlace,
    SpillFiles,
    capture_block_inputs,
    walk_blocks,
)
from ..calib.stats import ChannelStats
from ..calib.text import load_documents, sample_calibration
from ..config import CMPQConfig, RTNConfig
from ..errors import CmpqError
from ..format.cost import LayerShape, stored_bits
from ..format.layer import LUTLayer
from ..memory import available_memory_bytes, peak_rss_bytes, return_freed_memory
from ..models.conventions import needs_bos
from ..models.devices import ToDevice, resolve_device
from ..models.graph import (
    block_linears,
    decoder_blocks,
    quantizable_linears,
    replace_module,
    set_weight_matrix,
    untie_lm_head,
    weight_matrix,
)
from ..runtime.qlinear import QuantizedLinear
from .executor import Executor, ThreadExecutor
from .feedback import FeedbackOperator, GramSource, feedback_operator, quantize_layer_feedback
from .outliers import activation_outliers, activation_scale
from .report import QuantizationReport
from .rtn import rtn_dequantize, rtn_quantize, rtn_stored_bits
from .tables import column_distortions, quantize_layer
from .tuning import (
    Teacher,
    step_windows,
    teacher_states,
    tune_block_tables,
    tune_model_tables,
)
from .workdir import WorkDir


def quantize_rtn(model: nn.Module, config: RTNConfig, progress: bool = True) -> QuantizationReport:
    """RTN every decoder linear; the weights are replaced by their de-quantized values."""
    start = time.perf_counter()
    if config.include_lm_head:
        untie_lm_head(model)
    report = QuantizationReport(method=config.method, config=config.as_dict())
    linears = quantizable_linears(model, config.include_lm_head)
    for module in tqdm(linears.values(), desc="rtn", unit="linear", disable=not progress):
        weight = weight_matrix(module)
        quantized = rtn_quantize(weight, config.bits, config.group_size)
        set_weight_matrix(module, rtn_dequantize(quantized))
        report.add_layer(
            weight.numel(), rtn_stored_bits(*weight.shape, config.bits, config.group_size)
        )
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hidden_state_dtype(name: str) -> torch.dtype:
    """The torch dtype ``hidden_dtype`` names, or a clear error."""
    if name not in HIDDEN_DTYPES:
        choices = ", ".join(HIDDEN_DTYPES)
        raise CmpqError(f"`hidden_dtype` must be one of {choices} (got {name!r})")
    return HIDDEN_DTYPES[name]


def calibration_batch(tokenizer, model, config: CMPQConfig) -> torch.Tensor:
    """The calibration windows ``config`` asks for, sampled with its seed."""
    bos = tokenizer.bos_token_id if needs_bos(tokenizer, model) else None
    documents = load_documents(config.calib)
    return sample_calibration(
        documents, tokenizer, config.calib_samples, config.calib_seqlen, config.seed, bos
    )


class BlockSink(Protocol):
    """Where a quantized block goes once its linears are replaced."""

    def write(self, index: int, block: nn.Module) -> None: ...

    def restore(self, index: int, block: nn.Module, layout: str) -> None:
        """Put back in ``block`` the quantized linears an interrupted run wrote."""
        ...


class KeepInModel:
    """The quantized blocks stay in the model (the in-memory API)."""

    def write(self, index: int, block: nn.Module) -> None:
        pass

    def restore(self, index: int, block: nn.Module, layout: str) -> None:
        raise CmpqError("a model quantized in memory cannot continue an interrupted run")


@dataclass(frozen=True)
class Allocation:
    """Every channel's width and the outlier fraction: the plan pass 2 applies."""

    code_bits: float
    outlier_fraction: float
    widths: dict[str, torch.Tensor] | None = None  # rd plans, by full name; else the paper rule

    def widths_of(self, name: str, statistic: torch.Tensor, mixed: bool) -> torch.Tensor:
        if self.widths is not None:
            return self.widths[name]
        return paper_allocation(statistic, self.code_bits, mixed)


def plan_allocation(
    shapes: dict[str, LayerShape],
    config: CMPQConfig,
    distortions: dict[str, torch.Tensor] | None = None,
) -> Allocation:
    """Solve the widths (from ``distortions`` for rd plans) under the total budget."""
    outlier_fraction = sum(config.outlier_fractions)
    try:
        if config.allocation == "paper":
            budget = solve_budget(
                list(shapes.values()), config.bits, config.layout, outlier_fraction, config.mixed
            )
            return Allocation(budget.code_bits, budget.outlier_fraction)
        layer_budgets = None  # rd and rd-fisher trade bits between layers too
        if config.allocation == "rd-layer":
            paper = solve_budget(
                list(shapes.values()), config.bits, "column", outlier_fraction, config.mixed
            )
            layer_budgets = rd_layer_budgets(
                shapes, paper.code_bits, outlier_fraction, config.mixed
            )
        plan = rd_plan(
            shapes, distortions, config.bits, outlier_fraction, layer_budgets=layer_budgets
        )
    except ValueError as exc:
        raise CmpqError(str(exc)) from None
    code_bits = (
        sum(float(plan.widths[n].sum()) * shapes[n].out_features for n in shapes) / plan.params
    )
    return Allocation(code_bits, plan.outlier_fraction, plan.widths)


def gram_bytes(shapes: dict[str, LayerShape]) -> int:
    """An upper bound of the float64 Gram matrices' bytes (shared inputs counted per linear)."""
    return sum(8 * shape.in_features**2 for shape in shapes.values())


GRAM_DISK_SHARE = 0.5  # Gram matrices are kept on disk when they take at most this much of it
# the hidden states go to memory-mapped files when a block's inputs and outputs together
# would take more than this share of the memory available when the run starts
HIDDEN_MEMORY_SHARE = 0.25


def quantize_cmpq(
    model: nn.Module,
    config: CMPQConfig,
    calibration: torch.Tensor | None,
    progress: bool = True,
    stats: dict[str, ChannelStats] | None = None,
    executor: Executor | None = None,
    *,
    loader: BlockLoader | None = None,
    sink: BlockSink | None = None,
    workdir: WorkDir | None = None,
    hidden_dtype: torch.dtype = torch.float32,
) -> QuantizationReport:
    """CMPQ every decoder linear, replacing each with a :class:`QuantizedLinear`.

    Two passes over the blocks, each holding one block at a time: the first
    measures every linear (per-channel statistics and each column's distortion at
    every width; the Gram matrices are written to ``workdir`` when its disk has
    room, otherwise the second pass computes them again), the allocation is
    solved, and the second quantizes each block and hands it to ``sink``. The
    paper rule needs no measurements first: it runs the second pass alone.

    ``stats`` (from :func:`cmpq.calib.looper.collect_stats`, by full linear name)
    skips calibration: statistics of the full-precision model can be reused
    across runs that differ only in bits or quantizer options. ``executor`` runs
    the per-linear work (default: :class:`~.executor.ThreadExecutor`); ``loader``
    puts each block's weights in place (default: where they are); ``sink`` takes
    each quantized block (default: it stays in the model); ``workdir`` holds what
    each pass finished (default: a temporary directory, removed at the end; a
    resumable one lets an interrupted run continue from its last finished block);
    ``hidden_dtype`` holds the calibration hidden states between blocks (float32:
    exact; bfloat16 halves their memory, every block still computes in float32);
    when they would take more than :data:`HIDDEN_MEMORY_SHARE` of the available
    memory they are kept in memory-mapped files in ``workdir`` instead.
    """
    start = time.perf_counter()
    config = config.with_model_tuning(whole=sink is None)
    teacher = model_teacher(model, config, calibration, sink)
    weights = loss_weights(model, config, calibration, sink, progress)
    owned = workdir is None
    workdir = WorkDir.temporary() if owned else workdir
    run = _Run(
        model,
        config,
        calibration,
        progress,
        stats,
        ThreadExecutor() if executor is None else executor,
        _Trimming(InPlace() if loader is None else loader),
        KeepInModel() if sink is None else sink,
        workdir,
        hidden_dtype,
        weights,
    )
    try:
        report = run.quantize()
    finally:
        if owned:
            workdir.remove()
    if teacher is not None:
        steps, lr = config.tune_model, config.tune_model_lr
        tuning = tune_model_tables(
            model,
            teacher,
            step_windows(calibration, config.tune_model_seqlen),
            steps,
            lr,
            progress,
            config.tune_norms,
            config.model_tuning_rate,
            config.tune_outliers,
        )
        report.tuning["model"] = dataclasses.asdict(tuning)
        del teacher
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def require_whole_model(option: str, remedy: str, sink, calibration) -> None:
    """Refuse ``option`` (work on the whole model at once: model tuning, rd-fisher's
    backward pass) while blocks stream to a ``sink``, or without calibration windows."""
    if sink is not None:
        raise CmpqError(
            f"{option} needs the whole model in memory; it cannot run while a checkpoint "
            f"is quantized one block at a time ({remedy} or load the model whole)"
        )
    if calibration is None:
        raise CmpqError(f"{option} needs `calibration` windows")


def model_teacher(
    model: nn.Module, config: CMPQConfig, calibration: torch.Tensor | None, sink
) -> Teacher | None:
    """The full-precision ``model``'s last hidden states on the windows ``tune_model``
    will use (``None`` when off)."""
    if not config.tune_model:
        return None
    require_whole_model("`tune_model`", "set `tune_model` 0", sink, calibration)
    windows = step_windows(calibration, config.tune_model_seqlen)
    return teacher_states(model, windows, config.tune_model)


# calibration windows whose loss gradients price each layer's distortion under rd-fisher
# (16 of 512 tokens: 37 s on smollm2-135m, 2 cores; docs/decisions.md)
LOSS_GRADIENT_WINDOWS = 16


def loss_weights(
    model: nn.Module, config: CMPQConfig, calibration: torch.Tensor | None, sink, progress: bool
) -> dict[str, float] | None:
    """Under ``allocation`` rd-fisher, each linear's loss gradient energy at its
    outputs (:func:`cmpq.calib.gradients.output_gradient_energy`), by full name;
    ``None`` for the other allocations."""
    if config.allocation != "rd-fisher":
        return None
    require_whole_model("`allocation` rd-fisher", "use `allocation` rd-layer", sink, calibration)
    return output_gradient_energy(model, calibration[:LOSS_GRADIENT_WINDOWS], progress)


class _Trimming:
    """A loader whose every release hands the memory freed back to the system."""

    def __init__(self, loader: BlockLoader) -> None:
        self.loader = loader

    def load(self, index: int, block: nn.Module) -> None:
        self.loader.load(index, block)

    def release(self, index: int, block: nn.Module) -> None:
        self.loader.release(index, block)
        return_freed_memory()


@dataclass
class _Run:
    """One :func:`quantize_cmpq` run: its passes over the blocks."""

    model: nn.Module
    config: CMPQConfig
    calibration: torch.Tensor | None
    progress: bool
    stats: dict[str, ChannelStats] | None
    executor: Executor
    loader: BlockLoader
    sink: BlockSink
    workdir: WorkDir
    hidden_dtype: torch.dtype = torch.float32
    loss_weights: dict[str, float] | None = None  # rd-fisher's, by full linear name

    def __post_init__(self) -> None:
        linears = quantizable_linears(self.model)
        self.shapes = {name: LayerShape(*weight_matrix(m).shape) for name, m in linears.items()}
        self.prefix, self.blocks = decoder_blocks(self.model)
        self.measures = self.config.allocation != "paper"
        self.grams_on_disk = (
            self.measures
            and self.config.error_feedback
            and not self.config.sequential  # pass 2 measures them again, on its inputs
            and self.stats is None
            and gram_bytes(self.shapes) <= GRAM_DISK_SHARE * self.workdir.free_bytes()
        )
        self.inputs: BlockInputs | None = None
        self.spill = self._spill_files()
        self.tuning: dict[str, dict] = {}  # block name: its table tuning (BlockTuning)

    def _spill_files(self) -> SpillFiles | None:
        """Files for the hidden states, when a block's inputs and outputs would take
        more than :data:`HIDDEN_MEMORY_SHARE` of the memory available now."""
        if self.calibration is None:
            return None
        windows, seqlen = self.calibration.shape
        width = self.model.get_input_embeddings().embedding_dim
        walk_bytes = 2 * windows * seqlen * width * self.hidden_dtype.itemsize
        if walk_bytes <= HIDDEN_MEMORY_SHARE * available_memory_bytes():
            return None
        return SpillFiles(self.workdir.path / "hidden")

    def _check_stats(self) -> None:
        if self.config.tune_tables and self.calibration is None:
            raise CmpqError("`tune_tables` needs `calibration` windows (the blocks' inputs)")
        if self.stats is None:
            return
        if self.config.sequential:
            raise CmpqError(
                "`stats` (precomputed statistics) cannot be used with `sequential` calibration"
            )
        if self.config.error_feedback and any(s.gram is None for s in self.stats.values()):
            raise CmpqError(
                "error feedback needs statistics collected with gram=True "
                "(cmpq.calib.looper.collect_stats(..., gram=True))"
            )

    def _given_stats(self, index: int) -> dict[str, ChannelStats]:
        names = block_linears(self.blocks[index])
        return {name: self.stats[f"{self.prefix}.{index}.{name}"] for name in names}

    def _block_inputs(self) -> BlockInputs:
        if self.inputs is None:
            self.inputs = capture_block_inputs(
                self.model, self.calibration, self.hidden_dtype, self.spill
            )
        return self.inputs

    def quantize(self) -> QuantizationReport:
        self._check_stats()
        distortions = self.measure() if self.measures else None
        self.allocation = plan_allocation(self.shapes, self.config, distortions)
        self.quantize_blocks()
        for index, block in enumerate(self.blocks):
            if not any(isinstance(m, QuantizedLinear) for m in block.modules()):
                self.sink.restore(index, block, self.config.layout)  # done by an earlier run
        report = QuantizationReport(method=self.config.method, config=self.config.as_dict())
        report.code_bits = self.allocation.code_bits
        report.tuning = {"blocks": self.tuning} if self.tuning else {}
        for index in range(len(self.blocks)):
            rows, statistics = self.workdir.done(index)
            for _name, weights, bits in rows:
                report.add_layer(weights, bits)
            report.channel_statistics.update(statistics)
        round_unquantized_to_fp16(self.model)
        return report

    # pass 1 -----------------------------------------------------------------------------
    def measure(self) -> dict[str, torch.Tensor]:
        """Pass 1: every block's statistics and distortions (and Gram matrices) to the
        work directory; returns the distortions by full linear name."""

        def measure_one(index: int, block: nn.Module, measured: dict[str, ChannelStats]) -> None:
            if self.grams_on_disk:  # to disk first: not in memory beside the fits below
                self.workdir.save_grams(index, measured)
                for stats in measured.values():
                    stats.gram = None
            weights = None
            if self.loss_weights is not None:
                full = f"{self.prefix}.{index}"
                weights = {name: self.loss_weights[f"{full}.{name}"] for name in measured}
            distortions = block_distortions(block, measured, self.config, self.executor, weights)
            return_freed_memory()  # the fits' temporaries, freed on the worker threads
            self.workdir.save_measurement(index, measured, distortions)

        if self.stats is not None:
            for index in tqdm(
                range(len(self.blocks)), desc="measure", unit="block", disable=not self.progress
            ):
                with self._loaded(index) as block:
                    measure_one(index, block, self._given_stats(index))
        else:
            walk_blocks(
                self.model,
                self._block_inputs(),
                measure_one,
                progress=self.progress,
                gram=self.grams_on_disk,
                loader=self.loader,
                **self._walk_state("measure", self.workdir.measured),
                desc="measure",
                spill=self.spill,
            )
        distortions = {}
        for index in range(len(self.blocks)):
            _, measured = self.workdir.measurement(index)
            distortions.update({f"{self.prefix}.{index}.{n}": d for n, d in measured.items()})
        return distortions

    @contextmanager
    def _loaded(self, index: int):
        block = self.blocks[index]
        self.loader.load(index, block)
        try:
            yield block
        finally:
            self.loader.release(index, block)

    # pass 2 -----------------------------------------------------------------------------
    def quantize_blocks(self) -> None:
        """Pass 2: quantize every block not finished yet; without the Gram matrices at
        hand (error feedback, paper rule or no room on disk) calibration runs again."""
        tune = self.config.tune_tables > 0
        walk_again = self.config.sequential or tune
        if self.stats is None:
            walk_again = walk_again or not self.measures
            walk_again = walk_again or (self.config.error_feedback and not self.grams_on_disk)
        if not walk_again:
            todo = [i for i in range(len(self.blocks)) if not self.workdir.is_done(i)]
            for index in tqdm(todo, desc="quantize", unit="block", disable=not self.progress):
                with self._loaded(index) as block:
                    self.quantize_block(index, block, {})
            return
        if all(self.workdir.is_done(i) for i in range(len(self.blocks))):
            return
        walk_blocks(
            self.model,
            self._block_inputs(),
            self.quantize_block,
            sequential=self.config.sequential,
            progress=self.progress,
            gram=self.config.error_feedback and self.stats is None and not self.grams_on_disk,
            loader=self.loader,
            **self._walk_state("quantize", self.workdir.is_done),
            desc="quantize",
            spill=self.spill,
            io=tune,
        )

    def _walk_state(self, stage: str, finished) -> dict:
        """Where a walk of ``stage`` resumes (``start``: ``None`` unless every block
        before it is ``finished``) and how it saves itself after each block."""
        start = self.workdir.walk(stage)
        if start is not None and not all(finished(i) for i in range(start.index)):
            start = None

        def save(walk: BlockWalk) -> None:
            self.workdir.save_walk(stage, walk, final=walk.index == len(self.blocks))

        return {"start": start, "after_block": save}

    def _planned_stats(self, index: int, walked: dict[str, ChannelStats]):
        """The statistics the plan was made from: given, pass 1's, or this walk's."""
        if self.stats is not None:
            return self._given_stats(index)
        if self.measures:
            return self.workdir.measurement(index)[0]
        return walked

    def quantize_block(
        self,
        index: int,
        block: nn.Module,
        walked: dict[str, ChannelStats],
        io: BlockIO | None = None,
    ):
        """Quantize ``block``'s linears (``walked``: this pass's statistics, when it
        measured them; ``io``: the block's calibration inputs and outputs, when its
        tables are tuned), hand the block to the sink and record it as done.

        Widths follow the plan; outliers and error feedback follow the inputs the
        block gets now: the quantized blocks' outputs with ``sequential``, else the
        full-precision model's."""
        names = list(block_linears(block))
        planned = self._planned_stats(index, walked)
        seen = walked if self.config.sequential else planned
        if self.grams_on_disk:  # read from disk only while its operator is made
            grams = self.workdir.gram_loaders(index, local=self.executor.same_machine)
        else:
            grams = {n: _gram_of(walked, n, default=_gram_of(planned, n)) for n in names}
        full = f"{self.prefix}.{index}"
        statistics = {n: seen[n].statistic(self.config.statistic).cpu() for n in names}
        energies = {n: seen[n].energy() for n in names}
        del planned, seen
        if self.stats is None:  # the walk's Gram matrices are ours: only `grams` holds them now
            for stats in walked.values():
                stats.gram = None
        plan = (self.allocation, self.config, self.executor)
        layers = quantize_block_linears(block, full, energies, statistics, grams, *plan)
        rows = []
        for name, layer in zip(names, layers, strict=True):
            module = block.get_submodule(name)
            quantized = QuantizedLinear.from_layer(on_cpu(layer), module.bias)
            replace_module(block, name, quantized)
            bits = stored_bits(quantized.stored_tensors())
            rows.append((f"{full}.{name}", module.weight.numel(), bits))
        if io is not None and self.config.tune_tables:
            tuning = tune_block_tables(
                block, io.hidden, io.kwargs, io.outputs, self.config.tune_tables,
                self.config.tune_tables_lr,
            )  # fmt: skip
            self.tuning[full] = dataclasses.asdict(tuning)
        self.sink.write(index, block)
        self.workdir.save_done(index, rows, {f"{full}.{n}": statistics[n].float() for n in names})
        self.workdir.drop_grams(index)


def _gram_of(stats: dict[str, ChannelStats], name: str, default=None) -> torch.Tensor | None:
    """``name``'s XᵀX in ``stats``, or ``default`` when it has none there."""
    gram = stats[name].gram if name in stats else None
    return default if gram is None else gram


def on_cpu(layer: LUTLayer) -> LUTLayer:
    """``layer`` with its tensors on the CPU (where packing runs)."""

    def moved(value):
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    fields = {f.name: moved(getattr(layer, f.name)) for f in dataclasses.fields(layer)}
    return dataclasses.replace(layer, **fields)


def quantize_block_linears(
    block: nn.Module,
    full: str,
    energies: dict[str, torch.Tensor],
    statistics: dict[str, torch.Tensor],
    grams: dict[str, GramSource | None],
    allocation: Allocation,
    config: CMPQConfig,
    executor: Executor,
) -> list:
    """The :class:`~cmpq.format.layer.LUTLayer` of each of ``block``'s linears, in order:
    widths from ``allocation`` (and each channel's ``statistics``), outliers ranked by
    ``energies`` (mean x² per channel), errors fed forward (with error feedback on)
    through the operator of each linear's Gram matrix in ``grams``.

    Linears fed one input share one Gram object (a tensor, or a
    :class:`~.workdir.StoredGram` read only while its operator is computed) and
    make one task: their operator is computed once, then each is quantized with
    it. The tasks run side by side on the executor, the costliest first, so a
    wide input's long factorization (an 8B MLP's 14336-wide XᵀX) overlaps the
    other linears' work. ``grams`` is emptied: each task lets go of its matrix
    once the operator is made.
    """
    linears = block_linears(block)
    act_fraction = min(config.outlier_fractions[0], allocation.outlier_fraction)

    def quantize_linear(name: str, operator: FeedbackOperator | None) -> LUTLayer:
        weight = weight_matrix(linears[name])
        out_features, in_features = weight.shape
        bits = allocation.widths_of(f"{full}.{name}", statistics[name], config.mixed)
        total = outlier_count(out_features, in_features, allocation.outlier_fraction)
        act = min(outlier_count(out_features, in_features, act_fraction), total)
        options = {
            "layout": config.layout,
            "act_outliers": act,
            "q_outliers": total - act,
            "iters": config.kmeans_iters,
            "seed": config.seed,
        }
        energy = energies[name]
        if operator is None:
            return quantize_layer(weight, bits, energy, **options)
        label = f"{full}.{name}"
        return quantize_layer_feedback(
            weight, bits, energy, None, damp=config.damp, label=label, operator=operator, **options
        )

    def quantize_group(group: tuple[list[str], list]) -> list[LUTLayer]:
        names, holder = group
        operator = None
        if config.error_feedback:
            operator = feedback_operator(holder.pop(), config.damp)  # the matrix goes here
        return [quantize_linear(name, operator) for name in names]

    members: dict[int, list[str]] = {}
    held: dict[int, list] = {}
    for name in linears:
        key = id(grams[name]) if config.error_feedback else id(name)
        members.setdefault(key, []).append(name)
        held.setdefault(key, [grams[name]])
    grams.clear()
    groups = [(members[key], held[key]) for key in members]

    def cost(group) -> float:  # factorization ~ in³, the fits ~ weights x in
        names, _ = group
        width = weight_matrix(linears[names[0]]).shape[1]
        weights = sum(weight_matrix(linears[n]).numel() for n in names)
        return (width**3 if config.error_feedback else 0) + 2000 * weights

    done = executor.map(quantize_group, groups, cost)
    by_name = {n: layer for (names, _), layers in zip(groups, done, strict=True)
               for n, layer in zip(names, layers, strict=True)}  # fmt: skip
    return [by_name[name] for name in linears]


def block_distortions(
    block: nn.Module,
    measured: dict[str, ChannelStats],
    config: CMPQConfig,
    executor: Executor,
    loss_weights: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Every column's output distortion at each candidate width, by linear name in
    the block: relative to the layer's output energy, or, with ``loss_weights``
    (the loss gradient energy at each linear's outputs), times that weight, an
    estimate of what the error adds to the loss.

    The O_act outliers the layer will keep are left out of the fits, as they
    will be at quantization time.
    """

    def distortion_of(item) -> torch.Tensor:
        name, module = item
        weight = weight_matrix(module).float()
        energy = measured[name].energy()
        act = outlier_count(*weight.shape, config.outlier_fractions[0])
        keep = ~activation_outliers(weight, activation_scale(energy), act)
        distortion = column_distortions(weight, energy, keep, RD_WIDTHS, seed=config.seed)
        if loss_weights is not None:
            return distortion * loss_weights[name]
        # relative to the layer's output energy, so a layer with loud activations does not
        # outbid the rest (summed as absolute output MSE, rd measured 4x worse than paper)
        output_energy = (energy.double() * column_square_sums(weight)).sum()
        return distortion / output_energy.clamp_min(1e-30)

    linears = list(block_linears(block).items())
    found = executor.map(distortion_of, linears, lambda item: weight_matrix(item[1]).numel())
    return {name: d for (name, _), d in zip(linears, found, strict=True)}


SQUARE_SUM_COLUMNS = 1024  # a multiple of the vector width: the same sums as all at once


def column_square_sums(weight: torch.Tensor) -> torch.Tensor:
    """``weight.double().square().sum(0)``, a block of columns at a time (no float64
    copy of the whole weight; the same bits, tested)."""
    starts = range(0, weight.shape[1], SQUARE_SUM_COLUMNS)
    return torch.cat(
        [weight[:, s : s + SQUARE_SUM_COLUMNS].double().square().sum(0) for s in starts]
    )


def round_unquantized_to_fp16(model: nn.Module) -> None:
    """Round every remaining fp32 parameter (embeddings, norms, lm_head, biases) to the
    fp16 value the packed checkpoint stores, so the model in memory is the one saved."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype == torch.float32:
                parameter.copy_(parameter.half().float())


def quantize(
    model: nn.Module,
    config,
    calibration: torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
    stats: dict[str, ChannelStats] | None = None,
    executor: Executor | None = None,
    device: str | torch.device | None = None,
    hidden_dtype: str = "float32",
) -> QuantizationReport:
    """Quantize ``model`` in place with ``config`` and return what was stored.

    CMPQ needs calibration windows: pass ``calibration`` (an int64 ``[n, seqlen]``
    token tensor), or a ``tokenizer`` to sample them from ``config.calib``.
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) is where calibration and
    quantization run; the model stays on the CPU, one block at a time moves there.
    ``hidden_dtype`` (``float32``, ``bfloat16``, ``float16``) holds the calibration
    hidden states between blocks.
    """
    device = resolve_device(device)
    held = hidden_state_dtype(hidden_dtype)
    if isinstance(config, RTNConfig):
        return quantize_rtn(model, config, progress)
    if isinstance(config, CMPQConfig):
        config = config.with_model_tuning(whole=True)
        # tuning and rd-fisher's loss gradients need the windows, not only statistics
        needs_windows = (
            config.tune_tables > 0 or config.tune_model > 0 or config.allocation == "rd-fisher"
        )
        if calibration is None and (stats is None or needs_windows):
            if tokenizer is None:
                raise CmpqError("CMPQ needs `calibration` windows or a `tokenizer` to sample them")
            calibration = calibration_batch(tokenizer, model, config)
        loader = ToDevice(device) if device.type != "cpu" else None
        return quantize_cmpq(
            model, config, calibration, progress, stats, executor, loader=loader, hidden_dtype=held
        )
    raise TypeError(f"unsupported config type {type(config).__name__}")
