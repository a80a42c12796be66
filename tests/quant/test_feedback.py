import pytest
import torch

from cmpq.alloc.paper import paper_allocation
from cmpq.calib.looper import collect_stats
from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.format.layer import dequantize_layer, from_tensors, to_tensors
from cmpq.quant.feedback import inverse_hessian_factor, quantize_layer_feedback
from cmpq.quant.pipeline import quantize
from cmpq.quant.tables import quantize_layer
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import make_tiny_model, tiny_batch


def _layer_problem(out=96, inp=64, tokens=2048, seed=0):
    """Correlated activations with a few loud channels, as in LLM layers."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=generator) / inp**0.5 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=generator) @ mixing
    x[:, :4] *= 8
    weight = torch.randn(out, inp, generator=generator) * 0.05
    gram = x.double().t() @ x.double()
    energy = x.double().square().mean(0)
    return weight, gram, energy


def _output_error(weight, restored, gram):
    delta = (weight - restored).double()
    return (
        torch.trace(delta @ gram @ delta.t())
        / torch.trace(weight.double() @ gram @ weight.double().t())
    ).item()


def test_inverse_hessian_factor_is_the_cholesky_of_the_damped_inverse():
    _, gram, _ = _layer_problem()
    gram[5, :] = gram[:, 5] = 0  # a channel that never activates
    factor, used = inverse_hessian_factor(gram, damp=0.01)
    factor = factor.double()
    assert used == 0.01
    damped = gram.clone()
    damped[5, 5] = 1.0
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    torch.testing.assert_close(factor.t() @ factor, torch.linalg.inv(damped), rtol=1e-4, atol=1e-9)
    assert torch.equal(factor, factor.triu())


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("code_bits", [2.2, 3.0])
def test_feedback_lowers_the_output_error(layout, code_bits):
    weight, gram, energy = _layer_problem()
    bits = paper_allocation(energy.sqrt(), code_bits)
    options = {"layout": layout, "act_outliers": 4, "q_outliers": 20, "block_size": 16}
    plain = quantize_layer(weight, bits, energy, layout=layout, act_outliers=4, q_outliers=20)
    fed = quantize_layer_feedback(weight, bits, energy, gram, **options)
    plain_error = _output_error(weight, dequantize_layer(plain), gram)
    fed_error = _output_error(weight, dequantize_layer(fed), gram)
    assert fed_error < 0.8 * plain_error


@pytest.mark.parametrize("layout", ["row", "column"])
def test_feedback_layer_is_stored_like_any_other(layout):
    weight, gram, energy = _layer_problem(out=40, inp=48)
    bits = paper_allocation(energy.sqrt(), 2.5)
    layer = quantize_layer_feedback(
        weight, bits, energy, gram, layout=layout, act_outliers=3, q_outliers=7, block_size=20
    )
    assert layer.outlier_values.numel() == 10
    assert [c.shape[1] for c in layer.codes] == layer.group_sizes
    for codes, width in zip(layer.codes, layer.group_bits, strict=True):
        assert int(codes.max()) < 2**width
    rebuilt = from_tensors(to_tensors(layer), 40, 48, layout)
    assert torch.equal(dequantize_layer(rebuilt), dequantize_layer(layer))


def test_error_feedback_quantizes_a_model_within_budget():
    batch = tiny_batch(3, 20)
    results = {}
    for feedback in (False, True):
        model = make_tiny_model("qwen2")
        config = CMPQConfig(bits=3.0, error_feedback=feedback, kmeans_iters=5, tune_model=0)
        report = quantize(model, config, calibration=batch, progress=False)
        assert 2.95 <= report.effective_bits <= 3.0
        results[feedback] = {
            n: m.dequantized_weight()
            for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)
        }
    assert all(not torch.equal(results[False][n], results[True][n]) for n in results[False])


def test_error_feedback_refuses_statistics_without_gram():
    model = make_tiny_model("llama")
    stats = collect_stats(model, tiny_batch(2, 12))
    with pytest.raises(CmpqError, match="gram=True"):
        quantize(model, CMPQConfig(bits=3.0, tune_model=0), stats=stats, progress=False)


def test_a_gram_matrix_that_is_not_positive_definite_gets_more_damping():
    gram = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # eigenvalues 4 and -2
    factor, used = inverse_hessian_factor(gram, damp=0.01)
    assert used == pytest.approx(10.0)  # 0.01 raised tenfold until H + λI is positive definite
    damped = gram + used * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(factor.double().t() @ factor.double(), torch.linalg.inv(damped))


def test_a_gram_matrix_with_non_finite_entries_falls_back_to_no_feedback():
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 1] = gram[1, 0] = float("nan")
    factor, used = inverse_hessian_factor(gram)
    assert used == float("inf") and torch.equal(factor, torch.eye(3))


def test_the_damping_fallback_is_said_in_one_warning_naming_the_layer():
    from cmpq.errors import CmpqWarning

    weight, gram, energy = _layer_problem(out=16, inp=8)
    gram = gram - 2 * gram.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    gram.diagonal().clamp_(min=1.0)  # positive diagonal, not positive definite
    bits = paper_allocation(energy.sqrt(), 2.5)
    with pytest.warns(CmpqWarning, match="blocks.3.up_proj: .* not positive definite") as record:
        layer = quantize_layer_feedback(weight, bits, energy, gram, label="blocks.3.up_proj")
    assert len(record) == 1
    assert torch.isfinite(dequantize_layer(layer)).all()
