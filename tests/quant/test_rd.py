import pytest
import torch

from cmpq.alloc.rd import RD_WIDTHS
from cmpq.calib.looper import collect_stats
from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.format.layer import dequantize_layer
from cmpq.models.graph import quantizable_linears
from cmpq.quant.executor import ThreadExecutor
from cmpq.quant.pipeline import quantize
from cmpq.quant.tables import column_distortions, quantize_layer
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import make_tiny_model, tiny_batch


def test_column_distortions_fall_with_width_and_match_the_quantizer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 12, generator=generator)
    energy = torch.rand(12, generator=generator).double() + 0.1
    keep = torch.ones_like(weight, dtype=torch.bool)
    distortion = column_distortions(weight, energy, keep, RD_WIDTHS, iters=25)
    assert distortion.shape == (12, len(RD_WIDTHS))
    assert bool((distortion[:, 1:] <= distortion[:, :-1] + 1e-9).all())
    # at 2 bits: the energy-weighted error of the column-layout quantizer
    bits = torch.full((12,), 2)
    restored = dequantize_layer(quantize_layer(weight, bits, energy.float(), layout="column"))
    direct = (weight - restored).double().square().sum(0) * energy
    # the estimate runs plain Lloyd; the quantizer also refines, so it is never worse
    assert bool((distortion[:, 1] >= direct * 0.999 - 1e-9).all())
    assert bool((distortion[:, 1] <= direct * 1.5).all())


def test_rd_allocation_quantizes_a_model_within_budget():
    batch = tiny_batch(3, 20)
    model = make_tiny_model("llama")
    stats = collect_stats(model, batch, gram=True)  # error feedback is on by default
    report = quantize(model, CMPQConfig(bits=5.0, allocation="rd", kmeans_iters=5), stats=stats)
    assert 4.9 <= report.effective_bits <= 5.0
    widths = [set(m.group_bits.tolist()) for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(widths) == len(quantizable_linears(make_tiny_model("llama")))
    assert len(set().union(*widths)) >= 3  # widths differ across channels and layers


def test_rd_allocation_refuses_what_it_cannot_do():
    with pytest.raises(CmpqError, match="use `layout` column"):
        CMPQConfig(allocation="rd", layout="row")
    assert CMPQConfig(allocation="rd", sequential=True).sequential  # issue 18: it can


def test_rd_layer_keeps_each_layer_within_its_paper_budget():
    from cmpq.alloc.budget import solve_budget
    from cmpq.alloc.rd import column_width_costs, rd_layer_budgets, rd_plan
    from cmpq.format.cost import LayerShape

    generator = torch.Generator().manual_seed(1)
    shapes = {"a": LayerShape(512, 48), "b": LayerShape(768, 64)}
    # layer b's channels are 1000x louder: a global trade would starve layer a
    distortions = {
        name: torch.rand(shape.in_features, 1, generator=generator).double()
        * torch.tensor([4.0**-w for w in RD_WIDTHS], dtype=torch.float64)
        * (1000.0 if name == "b" else 1.0)
        for name, shape in shapes.items()
    }
    paper = solve_budget(list(shapes.values()), 2.8, "column", 0.004, True)
    budgets = rd_layer_budgets(shapes, paper.code_bits, 0.004, True)
    plan = rd_plan(shapes, distortions, 2.8, 0.004, layer_budgets=budgets)
    for name, shape in shapes.items():
        index = torch.tensor([RD_WIDTHS.index(int(w)) for w in plan.widths[name]])
        cost = column_width_costs(shape.out_features).gather(0, index).sum()
        assert cost <= budgets[name]
        assert cost >= 0.95 * budgets[name]  # and spends nearly all of it
    assert 2.75 <= plan.total_bits <= 2.8
    global_plan = rd_plan(shapes, distortions, 2.8, 0.004)
    assert global_plan.widths["a"].float().mean() < plan.widths["a"].float().mean()


def test_rd_layer_quantizes_a_model_within_budget():
    batch = tiny_batch(3, 20)
    model = make_tiny_model("qwen2")
    stats = collect_stats(model, batch, gram=True)
    config = CMPQConfig(bits=4.0, allocation="rd-layer", layout="column", kmeans_iters=5)
    report = quantize(model, config, stats=stats)
    # tiny layers: the metadata set aside for up to 7 groups a layer is ~0.1 bits here
    assert 3.8 <= report.effective_bits <= 4.0


def test_thread_executor_keeps_the_order_of_its_items():
    calls = []

    def double(x: int) -> int:
        calls.append(torch.get_num_threads())
        return 2 * x

    assert ThreadExecutor(workers=2).map(double, [3, 1, 2], cost=lambda x: x) == [6, 2, 4]
    assert ThreadExecutor(workers=2).map(double, []) == []
    assert calls == [1, 1, 1]  # every item runs with one torch thread


def test_linears_quantized_side_by_side_equal_one_at_a_time():
    batch = tiny_batch(3, 20)
    stats = collect_stats(make_tiny_model("qwen2"), batch, gram=True)
    restored, previous = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):  # ThreadExecutor runs one worker per torch thread
            torch.set_num_threads(threads)
            model = make_tiny_model("qwen2")
            quantize(
                model,
                CMPQConfig(bits=3.0, kmeans_iters=5, tune_model=0),
                stats=stats,
                progress=False,
            )
            restored[threads] = {
                n: m.dequantized_weight()
                for n, m in model.named_modules()
                if isinstance(m, QuantizedLinear)
            }
    finally:
        torch.set_num_threads(previous)
    assert len(restored[1]) == len(quantizable_linears(make_tiny_model("qwen2")))
    assert all(torch.equal(restored[1][n], restored[2][n]) for n in restored[1])


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5, 4.0, 4.5])
def test_rd_layer_never_exceeds_the_target_where_metadata_weighs(target):
    """Few output rows make each column's group index weigh: rd-layer may use more
    groups than the paper rule it takes its layer budgets from, and sets that aside."""
    from cmpq.alloc.budget import solve_budget
    from cmpq.alloc.rd import rd_layer_budgets, rd_plan
    from cmpq.format.cost import LayerShape

    generator = torch.Generator().manual_seed(2)
    shapes = {"a": LayerShape(64, 128), "b": LayerShape(96, 128)}
    distortions = {  # a wide spread of loudness: many widths in a layer
        name: torch.rand(shape.in_features, 1, generator=generator).double() ** 8
        * torch.tensor([4.0**-w for w in RD_WIDTHS], dtype=torch.float64)
        for name, shape in shapes.items()
    }
    paper = solve_budget(list(shapes.values()), target, "column", 0.0045, True)
    budgets = rd_layer_budgets(shapes, paper.code_bits, 0.0045, True)
    plan = rd_plan(shapes, distortions, target, 0.0045, layer_budgets=budgets)
    assert plan.total_bits <= target
    assert any(len(plan.widths[name].unique()) > 2 for name in shapes)  # more than paper's two


def _mean_widths(model) -> dict[str, float]:
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            bits, sizes = module.group_header()
            widths[name] = sum(b * n for b, n in zip(bits, sizes, strict=True)) / sum(sizes)
    return widths


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_rd_fisher_gives_the_bits_to_the_layer_the_loss_cares_about(monkeypatch, scale):
    import cmpq.quant.pipeline as pipeline

    batch = tiny_batch(3, 20)
    loud = "model.layers.1.mlp.up_proj"
    found = {}

    def weights(model, windows, progress=True):
        found["windows"] = windows.shape
        return {name: scale if name == loud else 1.0 for name in quantizable_linears(model)}

    monkeypatch.setattr(pipeline, "output_gradient_energy", weights)
    model = make_tiny_model("llama")
    config = CMPQConfig(bits=3.0, allocation="rd-fisher", kmeans_iters=5, tune_model=0)
    report = quantize(model, config, calibration=batch, progress=False)
    assert found["windows"] == (3, 20)  # all of them: fewer than LOSS_GRADIENT_WINDOWS
    assert report.effective_bits <= 3.0
    widths = _mean_widths(model)
    others = [w for name, w in widths.items() if name != loud]
    if scale > 1:  # the loss weighs its error a million times more: it gets the most bits
        assert widths[loud] > 5 > 1 == max(others)
    else:  # ... a million times less: the narrowest width, the others more
        assert widths[loud] == min(RD_WIDTHS) < sum(others) / len(others)


def test_rd_fisher_refuses_a_model_streamed_one_block_at_a_time():
    from cmpq.quant.pipeline import loss_weights

    config = CMPQConfig(allocation="rd-fisher")
    with pytest.raises(CmpqError, match="whole model in memory"):
        loss_weights(make_tiny_model("llama"), config, tiny_batch(2, 8), object(), False)
    with pytest.raises(CmpqError, match="`calibration` windows"):
        loss_weights(make_tiny_model("llama"), config, None, None, False)
    assert loss_weights(None, CMPQConfig(), None, object(), False) is None  # rd-layer: none
