from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cmpq.alloc.budget import outlier_count
from cmpq.calib.looper import collect_stats, run_block
from cmpq.calib.stats import ChannelStats
from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.format.layer import dequantize_layer
from cmpq.models.graph import block_linears, decoder_blocks, weight_matrix
from cmpq.quant.executor import ThreadExecutor
from cmpq.quant.feedback import quantize_layer_feedback
from cmpq.quant.pipeline import block_distortions, plan_allocation, quantize, quantize_cmpq
from cmpq.quant.tables import quantize_layer
from cmpq.quant.tuning import (
    TunableLinear,
    entry_gaps,
    final_states,
    held_out_windows,
    next_token_log_probs,
    norm_parameters,
    parameter_rates,
    relative_rates,
    step_windows,
    tune_block_tables,
)
from cmpq.runtime.qlinear import QuantizedLinear, quantized_layers

from tiny import ARCHITECTURES, make_tiny_model, tiny_batch


@pytest.mark.parametrize("layout", ["row", "column"])
def test_a_tunable_linear_rebuilds_exactly_the_stored_weight(layout):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=generator)
    energy = torch.rand(24, generator=generator) + 0.1
    bits = torch.randint(1, 5, (24,), generator=generator)
    layer = quantize_layer(weight, bits, energy, layout=layout, act_outliers=5, q_outliers=7)
    assert layer.outlier_values.numel() == 12
    tunable = TunableLinear(QuantizedLinear.from_layer(layer))
    assert torch.equal(tunable.weight(), dequantize_layer(layer))
    # every table entry gets the gradient of the weights that read it (a sum of the
    # outputs of x = ones: each weight's gradient is 1, the outliers' goes nowhere)
    tunable(torch.ones(1, 24)).sum().backward()
    assert tunable.table.grad.sum() == weight.numel() - 12


@pytest.mark.parametrize("layout", ["row", "column"])
def test_entry_gaps_are_the_mean_distance_to_each_entry_s_neighbours_in_its_table(layout):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 16, generator=generator)
    bits = torch.randint(1, 4, (16,), generator=generator)
    layer = quantize_layer(weight, bits, torch.ones(16), layout=layout)
    lut = torch.randn(sum(t.numel() for t in layer.luts), generator=generator)  # no ties
    gaps = entry_gaps(lut, layer)
    position = 0
    for group_bits, tables in zip(layer.group_bits, layer.luts, strict=True):
        size = 2**group_bits
        for start in range(position, position + tables.numel(), size):
            table = lut[start : start + size].tolist()
            for i, value in enumerate(table):
                below = [value - v for v in table if v < value]
                above = [v - value for v in table if v > value]
                sides = [min(d) for d in (below, above) if d]
                expected = sum(sides) / len(sides) if len(sides) == 2 else sides[0]
                assert gaps[start + i].item() == pytest.approx(expected, rel=1e-5)
        position += tables.numel()
    assert position == lut.numel()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("by_gaps, tune_outliers", [(False, False), (True, False), (False, True)])
def test_a_tunable_linear_s_gradients_are_autograd_s_through_the_rebuilt_weight(
    bias, by_gaps, tune_outliers
):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 20, generator=generator)
    energy = torch.rand(20, generator=generator) + 0.1
    bits = torch.randint(1, 4, (20,), generator=generator)
    layer = quantize_layer(weight, bits, energy, layout="column", act_outliers=3, q_outliers=4)
    quantized = QuantizedLinear.from_layer(layer, torch.randn(30) if bias else None)
    tunable = TunableLinear(quantized, by_gaps, tune_outliers)
    assert torch.equal(tunable.fp16_table(), quantized.lut)  # the same tables either way
    assert tunable.outliers.requires_grad == tune_outliers
    x = torch.randn(2, 5, 20, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 5, 30, generator=generator)
    (tunable(x) * upstream).sum().backward()
    # the reference: autograd through the gather, the outliers written over, and F.linear
    table = tunable.table.detach().clone().requires_grad_()
    outliers = tunable.outliers.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    rebuilt = tunable.rebuild(table, outliers)
    (F.linear(x_ref, rebuilt, tunable.bias) * upstream).sum().backward()
    torch.testing.assert_close(tunable.table.grad, table.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert table.grad.abs().sum() > 0
    if tune_outliers:
        torch.testing.assert_close(tunable.outliers.grad, outliers.grad)
        assert outliers.grad.abs().min() > 0


def _codes_and_tables(model):
    layers = {n: m.layer() for n, m in quantized_layers(model).items()}
    codes = {n: layer.codes for n, layer in layers.items()}
    return codes, {n: layer.luts for n, layer in layers.items()}


def test_block_tuning_moves_only_the_tables_and_never_raises_the_block_error():
    batch = tiny_batch(6, 24)
    config = CMPQConfig(bits=2.5, kmeans_iters=5)
    plain, tuned = make_tiny_model("llama"), make_tiny_model("llama")
    report_plain = quantize(plain, config, calibration=batch, progress=False)
    tuned_config = CMPQConfig(bits=2.5, kmeans_iters=5, tune_tables=30)
    report = quantize(tuned, tuned_config, calibration=batch, progress=False)

    blocks = report.tuning["blocks"]
    assert len(blocks) == 2
    assert all(b["after"] <= b["before"] for b in blocks.values())
    assert any(b["kept"] and b["after"] < 0.9 * b["before"] for b in blocks.values())
    # the same codes and stored bits; tables still fp16, and moved
    assert report.stored_bits == report_plain.stored_bits
    assert report.effective_bits == report_plain.effective_bits
    codes_plain, tables_plain = _codes_and_tables(plain)
    codes, tables = _codes_and_tables(tuned)
    same = [torch.equal(a, b) for n in codes for a, b in zip(codes[n], codes_plain[n], strict=True)]
    assert all(same)
    assert all(t.dtype == torch.float16 for luts in tables.values() for t in luts)
    pairs = [(a, b) for n in tables for a, b in zip(tables[n], tables_plain[n], strict=True)]
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_tables_that_do_not_lower_the_error_are_restored():
    batch = tiny_batch(4, 16)
    model = make_tiny_model("llama")
    block = decoder_blocks(model)[1][0]
    hidden, seen = [], {}

    def record(module, args, kwargs):
        hidden.append(args[0])
        seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        for window in batch:
            model(window.unsqueeze(0), use_cache=False)
    handle.remove()
    with torch.no_grad():
        targets = [run_block(block, h, seen) for h in hidden]
    quantize(
        model, CMPQConfig(bits=3.0, kmeans_iters=5, tune_model=0), calibration=batch, progress=False
    )
    before = {n: m.lut.clone() for n, m in quantized_layers(block).items()}
    wrecked = tune_block_tables(block, hidden, seen, targets, steps=5, lr=1.0)
    assert wrecked.after > wrecked.before and not wrecked.kept
    assert all(torch.equal(m.lut, before[n]) for n, m in quantized_layers(block).items())
    assert all(m.lut.dtype == torch.float16 for m in quantized_layers(block).values())


def _kl_to(teacher, model, batch) -> float:
    with torch.no_grad():
        p = F.log_softmax(teacher(batch).logits.float(), -1)
        q = F.log_softmax(model(batch).logits.float(), -1)
    return float(F.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean"))


def test_model_tuning_brings_the_next_token_distribution_closer():
    batch = tiny_batch(12, 24)  # 2 held out (with 6, one: noise on a tiny model)
    teacher = make_tiny_model("qwen2")
    results = {}
    for steps in (0, 60):
        model = make_tiny_model("qwen2")
        config = CMPQConfig(bits=2.5, kmeans_iters=5, tune_model=steps)
        report = quantize(model, config, calibration=batch, progress=False)
        results[steps] = (_kl_to(teacher, model, batch), report)
    (plain, report_plain), (tuned, report) = results[0], results[60]
    assert tuned < 0.8 * plain
    assert report.tuning["model"]["steps"] == 60 and "model" not in report_plain.tuning
    held = report.tuning["model"]
    assert held["kept"] and held["held_out_after"] < held["held_out_before"]
    assert report.stored_bits == report_plain.stored_bits
    assert all(m.lut.dtype == torch.float16 for m in quantized_layers(model).values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_teacher_s_last_hidden_states_give_the_model_s_own_distribution(arch):
    model = make_tiny_model(arch).eval()
    window = tiny_batch(1, 16)[0]
    with torch.no_grad():
        expected = F.log_softmax(model(window[None], use_cache=False).logits[0].float(), -1)
        ours = next_token_log_probs(model, final_states(model, window))
    torch.testing.assert_close(ours, expected)


def test_model_tuning_needs_the_model_whole():
    model = make_tiny_model("llama")

    class Sink:
        def write(self, index, block):
            pass

    with pytest.raises(CmpqError, match="whole model in memory"):
        quantize_cmpq(model, CMPQConfig(tune_model=2), tiny_batch(2, 8), sink=Sink())
    with pytest.raises(CmpqError, match="`tune_tables` must be at least 0"):
        CMPQConfig(tune_tables=-1)


def test_sequential_error_feedback_equals_a_hand_written_reference():
    """rd-layer widths planned on the full-precision model; each block then quantized
    with the statistics and XᵀX of the inputs the quantized blocks before it give."""
    batch = tiny_batch(5, 20)
    config = CMPQConfig(bits=3.0, kmeans_iters=5, sequential=True, tune_model=0)
    model = make_tiny_model("llama")
    quantize(model, config, calibration=batch, progress=False)

    reference = make_tiny_model("llama")
    prefix, blocks = decoder_blocks(reference)
    stats = collect_stats(reference, batch)
    distortions = {}
    for index, block in enumerate(blocks):
        measured = {n: stats[f"{prefix}.{index}.{n}"] for n in block_linears(block)}
        found = block_distortions(block, measured, config, ThreadExecutor())
        distortions.update({f"{prefix}.{index}.{n}": d for n, d in found.items()})
    shapes = {n: s for n, s in _shapes(reference).items()}
    allocation = plan_allocation(shapes, config, distortions)
    for index, block in enumerate(blocks):
        linears = block_linears(block)
        seen = {
            n: ChannelStats.zeros(weight_matrix(m).shape[1], gram=True) for n, m in linears.items()
        }
        hooks = [m.register_forward_pre_hook(lambda m, a, s=seen[n]: s.update(a[0]))
                 for n, m in linears.items()]  # fmt: skip
        with torch.no_grad():  # the blocks before this one are quantized already
            reference(batch, use_cache=False)
        for hook in hooks:
            hook.remove()
        for name, module in linears.items():
            weight = weight_matrix(module)
            total = outlier_count(*weight.shape, allocation.outlier_fraction)
            act = min(outlier_count(*weight.shape, config.outlier_fractions[0]), total)
            layer = quantize_layer_feedback(
                weight,
                allocation.widths[f"{prefix}.{index}.{name}"],
                seen[name].energy(),
                seen[name].gram,
                layout="column",
                act_outliers=act,
                q_outliers=total - act,
                iters=config.kmeans_iters,
                damp=config.damp,
            )
            quantized = QuantizedLinear.from_layer(layer, module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, quantized)
    got, want = quantized_layers(model), quantized_layers(reference)
    assert set(got) == set(want) and len(got) == 14
    for name in got:
        torch.testing.assert_close(got[name].dequantized_weight(), want[name].dequantized_weight())


def _shapes(model):
    from cmpq.format.cost import LayerShape
    from cmpq.models.graph import quantizable_linears

    return {n: LayerShape(*weight_matrix(m).shape) for n, m in quantizable_linears(model).items()}


def test_relative_rates_follow_each_linear_s_weight_scale():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 16, generator=generator)
    energy = torch.rand(16, generator=generator) + 0.1
    bits = torch.full((16,), 3)
    layers = {"small": 0.04, "large": 0.4}
    tunables = {
        name: TunableLinear(QuantizedLinear.from_layer(quantize_layer(s * weight, bits, energy)))
        for name, s in layers.items()
    }
    rates = relative_rates(tunables, share=0.01)
    rms = float(tunables["small"].weight().square().mean().sqrt())
    assert rates["small"] == pytest.approx(0.01 * rms)
    assert rms == pytest.approx(0.04, rel=0.2)  # the table rebuilds about the weight's scale
    assert rates["large"] == pytest.approx(10 * rates["small"], rel=0.02)
    # the config's auto rate is this rule; an explicit rate is every linear's
    assert CMPQConfig().tune_model_lr is None and CMPQConfig(tune_model_lr=3e-4).tune_model_lr
    with pytest.raises(CmpqError, match="`tune_model_lr` must be in"):
        CMPQConfig(tune_model_lr=0.0)


def test_model_tuning_checks_on_windows_it_never_steps_on():
    assert held_out_windows(128, 60) == (range(60), range(126, 128))
    assert held_out_windows(6, 60) == (range(5), range(5, 6))  # a quarter when few
    assert held_out_windows(3, 2) == (range(2), range(3, 3))  # too few: none held out


def test_model_tuning_steps_on_consecutive_pieces_of_each_window():
    windows = torch.arange(12).reshape(2, 6)
    assert step_windows(windows, None) is windows and step_windows(windows, 6) is windows
    assert step_windows(windows, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(CmpqError, match="does not divide"):
        step_windows(windows, 4)
    with pytest.raises(CmpqError, match="`tune_model_seqlen` must be at least 2 and divide"):
        CMPQConfig(calib_seqlen=512, tune_model_seqlen=300)


def test_model_tuning_on_half_windows_keeps_its_steps_and_checks_on_the_last_window_s_halves():
    batch = tiny_batch(12, 24)
    reports = {}
    for pieces in (None, 12):
        model = make_tiny_model("qwen2")
        config = CMPQConfig(
            bits=2.5, kmeans_iters=5, tune_model=20, calib_seqlen=24, tune_model_seqlen=pieces
        )
        reports[pieces] = quantize(model, config, calibration=batch, progress=False)
    whole, halves = reports[None].tuning["model"], reports[12].tuning["model"]
    assert whole["steps"] == halves["steps"] == 20
    # the halves' held-out check is on the last window's two halves, not on 2 windows
    assert halves["held_out_before"] != pytest.approx(whole["held_out_before"])
    assert halves["kept"] and halves["held_out_after"] < halves["held_out_before"]
    assert reports[12].stored_bits == reports[None].stored_bits


def test_model_tuning_that_raises_the_held_out_kl_is_undone():
    batch = tiny_batch(8, 16)
    outliers = {"outliers_act": 0.0005, "outliers_q": 0.001}  # auto's differ when tuned
    config = CMPQConfig(bits=3.0, kmeans_iters=5, tune_model=0, **outliers)
    plain, wrecked = make_tiny_model("llama"), make_tiny_model("llama")
    quantize(plain, config, calibration=batch, progress=False)
    wrecking = replace(config, tune_model=5, tune_model_lr=1.0)
    report = quantize(wrecked, wrecking, calibration=batch, progress=False)
    tuning = report.tuning["model"]
    assert tuning["held_out_after"] > tuning["held_out_before"] and not tuning["kept"]
    _, tables_plain = _codes_and_tables(plain)
    _, tables = _codes_and_tables(wrecked)
    for name, luts in tables.items():
        assert all(torch.equal(a, b) for a, b in zip(luts, tables_plain[name], strict=True))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_norm_parameters_are_every_norm_s_weights_and_nothing_else(arch):
    model = make_tiny_model(arch)
    norms = norm_parameters(model)
    blocks = len(decoder_blocks(model))
    assert len({id(p) for p in norms.values()}) == len(norms)
    assert all("norm" in name or "ln" in name for name in norms)
    # at least one norm a block (two where attention and MLP run one after the other;
    # phi runs them side by side on one) and a final one
    weights = [name for name in norms if name.endswith("weight")]
    assert len(weights) >= (1 if "phi" in type(model).__name__.lower() else 2) * blocks + 1
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert not linear_weights & {id(p) for p in norms.values()}


def test_norm_rates_follow_each_norm_s_scale():
    small, large = (
        torch.nn.Parameter(torch.full((8,), 0.5)),
        torch.nn.Parameter(torch.full((8,), 50.0)),
    )
    rates = parameter_rates({"small": small, "large": large}, share=0.01)
    assert rates["small"] == pytest.approx(0.005) and rates["large"] == pytest.approx(0.5)


def test_model_tuning_with_norms_moves_them_and_lowers_the_held_out_kl():
    batch = tiny_batch(12, 24)  # as above
    teacher = make_tiny_model("qwen2")
    results = {}
    for norms in (False, True):
        model = make_tiny_model("qwen2")
        config = CMPQConfig(bits=2.5, kmeans_iters=5, tune_model=60, tune_norms=norms)
        report = quantize(model, config, calibration=batch, progress=False)
        results[norms] = (model, report.tuning["model"])
    (plain, plain_tuning), (tuned, tuning) = results[False], results[True]
    assert plain_tuning["norm_weights"] == 0
    untouched = norm_parameters(teacher)
    for name, parameter in norm_parameters(plain).items():  # tables only: norms as loaded
        assert torch.equal(parameter, untouched[name].half().float())
    moved = norm_parameters(tuned)
    assert tuning["norm_weights"] == sum(p.numel() for p in moved.values()) > 0
    assert any(not torch.equal(p, untouched[n].half().float()) for n, p in moved.items())
    assert all(torch.equal(p, p.half().float()) for p in moved.values())  # stored exactly
    assert tuning["kept"] and tuning["held_out_after"] < tuning["held_out_before"]


def test_norms_tuned_with_tables_that_raise_the_held_out_kl_are_undone():
    batch = tiny_batch(8, 16)
    loaded = norm_parameters(make_tiny_model("llama"))
    model = make_tiny_model("llama")
    wrecking = CMPQConfig(
        bits=3.0, kmeans_iters=5, tune_model=5, tune_model_lr=1.0, tune_norms=True
    )
    tuning = quantize(model, wrecking, calibration=batch, progress=False).tuning["model"]
    assert not tuning["kept"] and tuning["norm_weights"] > 0
    for name, parameter in norm_parameters(model).items():
        assert torch.equal(parameter, loaded[name].half().float())


def test_model_tuning_at_rates_relative_to_the_table_gaps_lowers_the_held_out_kl():
    batch = tiny_batch(1, 24).repeat(6, 1)  # held-out windows the same text: it must fall
    model = make_tiny_model("qwen2")
    config = CMPQConfig(bits=2.5, kmeans_iters=5, tune_model=60, tune_model_rate="gaps")
    tuning = quantize(model, config, calibration=batch, progress=False).tuning["model"]
    assert tuning["kept"] and tuning["held_out_after"] < 0.8 * tuning["held_out_before"]
    assert all(m.lut.dtype == torch.float16 for m in quantized_layers(model).values())
    with pytest.raises(CmpqError, match="`tune_model_rate` must be one of"):
        CMPQConfig(tune_model_rate="bits")


@pytest.mark.parametrize("bits, rate", [(2.9, "weights"), (3.0, "gaps")])
def test_the_auto_rate_tunes_as_the_rate_for_the_budget_does(bits, rate):
    batch = tiny_batch(1, 24).repeat(6, 1)  # held-out windows the same text: tuning kept

    def tuned_tables(tune_model_rate: str) -> dict[str, torch.Tensor]:
        model = make_tiny_model("llama")
        config = CMPQConfig(
            bits=bits, kmeans_iters=5, tune_model=10, tune_model_rate=tune_model_rate
        )
        tuning = quantize(model, config, calibration=batch, progress=False).tuning["model"]
        assert tuning["kept"]
        return {n: m.lut for n, m in quantized_layers(model).items()}

    auto = tuned_tables("auto")
    assert CMPQConfig(bits=bits).model_tuning_rate == rate
    assert CMPQConfig(bits=bits, tune_model_rate="weights").model_tuning_rate == "weights"
    for name, lut in tuned_tables(rate).items():
        assert torch.equal(auto[name], lut)
    other = tuned_tables("gaps" if rate == "weights" else "weights")
    assert any(not torch.equal(auto[n], lut) for n, lut in other.items())


def test_model_tuning_with_outliers_moves_them_in_fp16_and_stores_the_same_bits():
    batch = tiny_batch(1, 24).repeat(6, 1)  # held-out windows the same text: tuning kept
    results = {}
    for tune_outliers in (False, True):
        model = make_tiny_model("qwen2")
        config = CMPQConfig(
            bits=3.5, kmeans_iters=5, tune_model=60, outliers_q=0.02, tune_outliers=tune_outliers
        )
        report = quantize(model, config, calibration=batch, progress=False)
        values = {n: m.outlier_values for n, m in quantized_layers(model).items()}
        results[tune_outliers] = (report, values)
    (plain, loaded), (report, tuned) = results[False], results[True]
    assert plain.tuning["model"]["outlier_values"] == 0
    count = sum(v.numel() for v in tuned.values())
    assert report.tuning["model"]["outlier_values"] == count > 0
    assert all(v.dtype == torch.float16 for v in tuned.values())
    moved = sum(int((tuned[n] != loaded[n]).sum()) for n in tuned)
    assert moved > count // 2  # the untuned run keeps them as quantization chose them
    assert report.tuning["model"]["kept"] and report.stored_bits == plain.stored_bits
    assert report.tuning["model"]["held_out_after"] < plain.tuning["model"]["held_out_after"]


def test_outliers_tuned_with_tables_that_raise_the_held_out_kl_are_undone():
    batch = tiny_batch(8, 16)
    outliers = {"outliers_act": 0.0005, "outliers_q": 0.02}
    config = CMPQConfig(bits=3.5, kmeans_iters=5, tune_model=0, **outliers)
    plain, wrecked = make_tiny_model("llama"), make_tiny_model("llama")
    quantize(plain, config, calibration=batch, progress=False)
    wrecking = replace(config, tune_model=5, tune_model_lr=1.0, tune_outliers=True)
    tuning = quantize(wrecked, wrecking, calibration=batch, progress=False).tuning["model"]
    assert not tuning["kept"] and tuning["outlier_values"] > 0
    loaded = quantized_layers(plain)
    for name, layer in quantized_layers(wrecked).items():
        assert torch.equal(layer.outlier_values, loaded[name].outlier_values)
