import pytest
import torch

from cmpq.config import RTNConfig
from cmpq.errors import CmpqError
from cmpq.models.graph import quantizable_linears, weight_matrix
from cmpq.quant.pipeline import quantize
from cmpq.quant.rtn import rtn_dequantize, rtn_quantize, rtn_stored_bits

from tiny import make_tiny_model


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_round_trip_error_within_half_a_step(bits, group_size):
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    quantized = rtn_quantize(weight, bits, group_size)
    restored = rtn_dequantize(quantized)
    step = quantized.scales.float().repeat_interleave(quantized.group_size, dim=1)[:, :128]
    error = (restored - weight).abs()
    # half a step, plus the fp16 rounding of the stored minimum
    assert (error <= step / 2 + 1e-3 * weight.abs().max()).all()
    assert int(quantized.codes.max()) <= 2**bits - 1


def test_error_falls_with_bits_and_smaller_groups():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))

    def mse(bits, group):
        return (rtn_dequantize(rtn_quantize(weight, bits, group)) - weight).pow(2).mean()

    assert mse(2, 64) > mse(3, 64) > mse(4, 64) > mse(8, 64)
    assert mse(3, None) > mse(3, 128) > mse(3, 32)


def test_grid_values_are_lossless():
    codes = torch.randint(0, 8, (8, 96), generator=torch.Generator().manual_seed(0)).float()
    weight = codes * 0.25 - 1.0  # every group spans the full 3-bit grid 0..7
    weight[:, ::32] = -1.0
    weight[:, 1::32] = 0.75
    restored = rtn_dequantize(rtn_quantize(weight, 3, 32))
    torch.testing.assert_close(restored, weight)


def test_partial_last_group_uses_its_own_range():
    weight = torch.zeros(2, 576)
    weight[:, :512] = torch.linspace(-100, 100, 512)
    weight[:, 512:] = torch.linspace(-0.01, 0.01, 64)  # last group of 576 with 128: 64 wide
    quantized = rtn_quantize(weight, 4, 128)
    assert quantized.scales.shape == (2, 5)
    tail_error = (rtn_dequantize(quantized)[:, 512:] - weight[:, 512:]).abs().max()
    assert tail_error < 0.01 / 15 + 1e-5


def test_stored_bits_count_scales_and_minimums():
    assert rtn_stored_bits(10, 128, 3, 64) == {"codes": 10 * 128 * 3, "scales": 10 * 2 * 32}
    assert rtn_stored_bits(10, 576, 3, 128) == {"codes": 10 * 576 * 3, "scales": 10 * 5 * 32}
    assert rtn_stored_bits(10, 576, 4, None) == {"codes": 10 * 576 * 4, "scales": 10 * 32}


@pytest.mark.parametrize("bits", [1, 9, 2.5])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(CmpqError, match="integer from 2 to 8"):
        RTNConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, -64])
def test_non_positive_group_size_rejected(group_size):
    with pytest.raises(CmpqError, match="positive"):
        RTNConfig(bits=3, group_size=group_size)


def test_quantize_model_counts_every_stored_bit(tiny_model):
    arch, model = tiny_model
    before = {n: weight_matrix(m).clone() for n, m in quantizable_linears(model).items()}
    report = quantize(model, RTNConfig(bits=3, group_size=64), progress=False)
    after = {n: weight_matrix(m) for n, m in quantizable_linears(model).items()}
    params = sum(w.numel() for w in before.values())
    # 3-bit codes + 32 bits of fp16 scale and minimum per (possibly partial) 64-wide group
    groups = sum(w.shape[0] * -(-w.shape[1] // 64) for w in before.values())
    assert report.quantized_params == params
    assert report.effective_bits == pytest.approx((3 * params + 32 * groups) / params)
    assert report.effective_bits >= 3.5
    for name, weight in after.items():
        assert not torch.equal(weight, before[name]), name
        # each 64-wide group holds at most 8 distinct values
        assert weight[0, :64].unique().numel() <= 8


def test_divisible_widths_give_exactly_three_and_a_half_bits():
    model = make_tiny_model("gpt2")  # widths 64 and 256 only
    assert quantize(model, RTNConfig(3, 64), progress=False).effective_bits == 3.5


def test_lm_head_quantized_without_touching_the_tied_embedding():
    model = make_tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding = model.get_input_embeddings().weight.detach().clone()
    quantize(model, RTNConfig(bits=2, group_size=32, include_lm_head=True), progress=False)
    torch.testing.assert_close(model.get_input_embeddings().weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)
