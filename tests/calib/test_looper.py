import pytest
import torch

from cmpq.calib import looper
from cmpq.calib.looper import collect_stats
from cmpq.calib.stats import ChannelStats, token_gram
from cmpq.config import PAPER_METHOD, CMPQConfig
from cmpq.models.graph import quantizable_linears
from cmpq.quant.pipeline import quantize
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import ARCHITECTURES, make_tiny_model, tiny_batch


def test_channel_stats_accumulate_exactly():
    stats = ChannelStats.zeros(3)
    stats.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -4.0]]))
    stats.update(torch.tensor([[[0.0, 2.0, 1.0]]]))
    assert stats.tokens == 3
    assert stats.sum_sq.tolist() == [10.0, 9.0, 17.0]
    assert stats.sum_abs.tolist() == [4.0, 5.0, 5.0]
    assert stats.max_abs.tolist() == [3.0, 2.0, 4.0]
    torch.testing.assert_close(
        stats.statistic("l2"), torch.tensor([10.0, 9.0, 17.0]).double().sqrt()
    )
    torch.testing.assert_close(
        stats.statistic("mean_abs"), torch.tensor([4 / 3, 5 / 3, 5 / 3]).double()
    )
    with pytest.raises(ValueError, match="unknown statistic"):
        stats.statistic("median")


def test_token_gram_is_the_full_product():
    # 200 channels: one full tile of 192 and a ragged one
    x = torch.randn(2, 7, 200, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(-1, 200).double()
    gram = token_gram(x)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, flat.t() @ flat, rtol=1e-5, atol=1e-5)
    assert torch.equal(gram, gram.t())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_looper_sees_what_the_full_model_sees(arch, monkeypatch):
    """Statistics from the block-by-block run, two windows per batch, equal hooks
    on a full forward of one window at a time."""
    monkeypatch.setattr(looper, "WINDOWS_PER_FORWARD", 2)  # batches of 2 and 1
    model = make_tiny_model(arch)
    batch = tiny_batch(3, 20)  # longer than Gemma 3's sliding window of 16
    stats = collect_stats(model, batch, gram=True)
    reference = {name: 0.0 for name in stats}

    def hook_for(name):
        def hook(module, args):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            reference[name] = reference[name] + x.t() @ x

        return hook

    for name, module in quantizable_linears(model).items():
        module.register_forward_pre_hook(hook_for(name))
    with torch.no_grad():
        for window in batch:
            model(window.unsqueeze(0))
    assert set(stats) == set(quantizable_linears(model))
    for name, value in stats.items():
        scale = reference[name].abs().max().item()  # float32 products: error relative to it
        torch.testing.assert_close(value.gram, reference[name], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(value.sum_sq, reference[name].diagonal(), rtol=1e-5, atol=1e-6)
        assert value.tokens == 60
    assert collect_stats(model, batch)[next(iter(stats))].gram is None  # only when asked


def test_sequential_calibration_changes_later_blocks_only():
    batch = tiny_batch(3, 20)
    results = {}
    for sequential in (False, True):
        model = make_tiny_model("llama")
        config = CMPQConfig(bits=4.5, sequential=sequential, kmeans_iters=5, **PAPER_METHOD)
        quantize(model, config, calibration=batch, progress=False)
        results[sequential] = {
            n: m.dequantized_weight()
            for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)
        }
    assert len(results[False]) == 14
    first_block = [n for n in results[False] if ".0." in n]
    later = [n for n in results[False] if ".1." in n]
    assert all(torch.equal(results[False][n], results[True][n]) for n in first_block)
    assert any(not torch.equal(results[False][n], results[True][n]) for n in later)


def test_wide_blocks_run_fewer_windows_per_forward():
    down = torch.nn.Linear(14336, 8)
    wide = torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"down_proj": down})})
    narrow = make_tiny_model("llama").model.layers[0]
    assert looper.windows_per_forward(narrow, 512) == looper.WINDOWS_PER_FORWARD == 8
    # one [512, 14336] float32 activation is 29 MB: two fit in 64 MB
    assert looper.windows_per_forward(wide, 512) == 2
    assert looper.windows_per_forward(wide, 4096) == 1  # never fewer than one


def test_token_gram_adds_into_a_given_accumulator():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    into = torch.ones(5, 5, dtype=torch.float64)
    assert token_gram(x, into=into) is into
    torch.testing.assert_close(into, 1 + x.double().t() @ x.double(), rtol=1e-6, atol=1e-6)
