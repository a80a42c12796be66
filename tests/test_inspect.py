"""`cmpq inspect`: the per-layer widths and bytes read back from a packed output
agree with the model that was saved, and every bad directory is one clear line."""

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmpq.cli import main
from cmpq.config import PAPER_METHOD, CMPQConfig, RTNConfig
from cmpq.errors import CmpqError
from cmpq.format.description import read_description, write_description
from cmpq.format.spec import STATS_FILE, WEIGHTS_FILE
from cmpq.inspection import (
    HEATMAP_FILE,
    as_dict,
    channel_bits,
    draw_heatmap,
    format_table,
    heatmap_rows,
    inspect_output,
    relative_profile,
    totals,
)
from cmpq.quant.pipeline import quantize
from cmpq.runtime.checkpoint import load_quantized, save_quantized
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import make_tiny_model, tiny_batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen2 quantized by the paper rule (two widths per layer, the wide
    ones to the loudest channels), saved; the model stays in memory."""
    model = make_tiny_model("qwen2")
    batch = tiny_batch(4, 24)
    config = CMPQConfig(bits=3.5, kmeans_iters=5, **PAPER_METHOD)
    report = quantize(model, config, calibration=batch, progress=False)
    out = save_quantized(model, tiny_tokenizer, report, tmp_path_factory.mktemp("q") / "q")
    return model, report, out


@pytest.fixture(scope="module")
def inspection(saved):
    return inspect_output(saved[2])


def quantized_modules(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_channel_bits_follow_each_columns_group():
    # columns 0 and 2 are in group 0 (2-bit), column 1 in group 1 (3-bit)
    bits = channel_bits(torch.tensor([0, 1, 0]), torch.tensor([2, 3]))
    assert bits.tolist() == [2, 3, 2]


def test_layers_in_block_order_with_histograms_over_all_channels(saved, inspection):
    model, _, _ = saved
    modules = quantized_modules(model)
    names = [layer.name for layer in inspection.layers]
    assert sorted(names) == sorted(modules)
    blocks = [int(name.split(".")[2]) for name in names]  # model.layers.<i>. ...
    assert blocks == sorted(blocks)
    for layer in inspection.layers:
        assert sum(layer.histogram.values()) == layer.in_features
        assert len(layer.histogram) == 2  # 3.5 total bits (2.1-bit codes): two widths a layer


def test_channel_bits_agree_with_the_quantized_layer(saved, inspection):
    model, _, _ = saved
    modules = quantized_modules(model)
    for layer in inspection.layers:
        stored = modules[layer.name].layer()
        expected = torch.zeros(stored.in_features, dtype=torch.int64)
        for g, bits in enumerate(stored.group_bits):
            expected[stored.perm[stored.offsets[g] : stored.offsets[g + 1]]] = bits
        assert torch.equal(layer.channel_bits, expected)
        assert (expected > 0).all()


def test_layer_bytes_are_the_bytes_of_its_stored_tensors(saved, inspection):
    _, _, out = saved
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as handle:
        keys = list(handle.keys())
        for layer in inspection.layers:
            own = [k for k in keys if k.startswith(f"{layer.name}.") and k != f"{layer.name}.bias"]
            nbytes = {k: handle.get_tensor(k).nbytes for k in own}
            assert layer.total_bytes == sum(nbytes.values())
            assert layer.stored_bytes["codes"] == nbytes[f"{layer.name}.codes"]
            assert layer.stored_bytes["lut"] == nbytes[f"{layer.name}.lut"]


def test_totals_are_the_reports_bits(saved, inspection):
    _, report, _ = saved
    summary = totals(inspection.layers)
    assert summary["bits_per_weight"] == pytest.approx(report.effective_bits)
    assert 8 * summary["bytes"]["total"] == report.stored_bits
    assert summary["params"] == report.quantized_params
    widths = sum(layer.in_features for layer in inspection.layers)
    assert sum(summary["histogram"].values()) == widths


def test_table_has_a_row_per_layer_and_the_total(saved, inspection):
    _, report, _ = saved
    table = format_table(inspection).splitlines()
    assert len(table) == 2 + len(inspection.layers) + 1  # title, header, layers, total
    for layer, row in zip(inspection.layers, table[2:], strict=False):
        assert row.startswith(layer.name)
        assert f"{layer.out_features}x{layer.in_features}" in row
    assert table[-1].startswith("total (14 linears)")
    assert table[-1].endswith(f"{report.effective_bits:.3f}")


def test_json_round_trips(inspection):
    payload = as_dict(inspection)
    assert json.loads(json.dumps(payload)) == payload
    first = payload["layers"][0]
    assert first["bytes"]["total"] == inspection.layers[0].total_bytes
    assert {int(b): n for b, n in first["histogram"].items()} == inspection.layers[0].histogram


def test_channel_statistics_are_saved_in_original_order(saved, inspection):
    model, report, out = saved
    with safe_open(str(out / STATS_FILE), framework="pt") as handle:
        stats = {k: handle.get_tensor(k) for k in handle.keys()}
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as handle:
        assert not set(stats) & set(handle.keys())  # beside the weights, not among them
    assert list(stats) == sorted(quantized_modules(model))
    for layer in inspection.layers:
        assert layer.activation.dtype == torch.float32
        torch.testing.assert_close(layer.activation, report.channel_statistics[layer.name])
        # the paper rule gives the wide codes to the loudest channels of each layer
        wide = layer.channel_bits == layer.channel_bits.max()
        assert wide[layer.activation.argmax()]
        assert layer.activation[wide].min() >= layer.activation[~wide].max()


def test_loading_does_not_need_the_statistics(tmp_path, saved):
    model, _, out = saved
    copy = shutil.copytree(out, tmp_path / "q")
    (copy / STATS_FILE).unlink()
    loaded, _ = load_quantized(copy, embedding_dtype="float32")
    x = tiny_batch(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert all(layer.activation is None for layer in inspect_output(copy).layers)


def test_heatmap_rows_pad_narrow_layers_and_missing_profiles():
    rows = heatmap_rows([torch.tensor([1, 2]), None, torch.tensor([3, 4, 5])])
    assert rows.shape == (3, 3)
    assert rows[0, :2].tolist() == [1.0, 2.0] and rows[0, 2].isnan()
    assert rows[1].isnan().all()
    assert rows[2].tolist() == [3.0, 4.0, 5.0]


def test_relative_profile_is_per_layer_and_blanks_silent_channels():
    profile = relative_profile(torch.tensor([0.0, 1.0, 10.0, 100.0]))
    assert profile[0].isnan()
    torch.testing.assert_close(profile[1:], torch.tensor([-1.0, 0.0, 1.0]))
    assert relative_profile(None) is None


def test_cli_prints_the_table_and_draws_the_png(capsys, tmp_path, saved, inspection):
    _, _, out = saved
    copy = shutil.copytree(out, tmp_path / "q")
    code, stdout, _ = run_cli(capsys, "inspect", str(copy))
    assert code == 0
    assert stdout.splitlines()[:-1] == format_table(inspect_output(copy)).splitlines()
    png = copy / HEATMAP_FILE
    assert stdout.splitlines()[-1] == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert width > 1000 and height > 300


def test_cli_json_to_stdout_is_the_json_alone(capsys, tmp_path, saved, inspection):
    _, _, out = saved
    code, stdout, err = run_cli(capsys, "inspect", str(out), "--json", "-", "--no-plot")
    assert code == 0
    assert json.loads(stdout) == as_dict(inspection)
    assert "--no-plot" in err
    assert not (out / HEATMAP_FILE).exists()


def test_cli_png_path_and_json_file(capsys, tmp_path, saved, inspection):
    _, _, out = saved
    png, report = tmp_path / "map.png", tmp_path / "inspect.json"
    code, _, _ = run_cli(capsys, "inspect", str(out), "--png", str(png), "--json", str(report))
    assert code == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert json.loads(report.read_text()) == as_dict(inspection)
    assert not (out / HEATMAP_FILE).exists()


def test_heatmap_without_statistics_still_draws(tmp_path, saved):
    _, _, out = saved
    copy = shutil.copytree(out, tmp_path / "q")
    (copy / STATS_FILE).unlink()
    draw_heatmap(inspect_output(copy), tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_matplotlib_names_the_extra(capsys, monkeypatch, tmp_path, saved, inspection):
    _, _, out = saved
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CmpqError, match=r"pip install cmpq\[plot\].*--no-plot"):
        draw_heatmap(inspection, tmp_path / "map.png")
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--no-plot")
    assert code == 0 and "heat map skipped" in stdout


@pytest.fixture(scope="module")
def rtn_output(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model("llama")
    report = quantize(model, RTNConfig(bits=4, group_size=32), progress=False)
    return save_quantized(model, tiny_tokenizer, report, tmp_path_factory.mktemp("rtn") / "q")


BAD_DIRECTORIES = [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("checkpoint", "is not a cmpq output: no cmpq.json"),
    ("rtn", "no per-channel layout to inspect"),
    ("truncated", "is not a readable cmpq output"),
    ("no_layers", "layers must map every quantized layer to its shape, found none"),
    ("missing_tensor", "tensor model.layers.1.mlp.up_proj.lut is missing"),
]


@pytest.mark.parametrize(("kind", "message"), BAD_DIRECTORIES)
def test_bad_directory_is_one_clear_line(
    capsys, tmp_path, tiny_checkpoint, saved, rtn_output, kind, message
):
    _, _, out = saved
    if kind == "file":
        (tmp_path / "file").write_text("not a directory")
    if kind in ("truncated", "no_layers", "missing_tensor"):
        copy = shutil.copytree(out, tmp_path / kind)
        weights = copy / WEIGHTS_FILE
        if kind == "truncated":
            weights.write_bytes(weights.read_bytes()[:100])
        elif kind == "missing_tensor":
            tensors = load_file(weights)
            del tensors["model.layers.1.mlp.up_proj.lut"]
            save_file(tensors, weights)
        else:
            write_description(copy, {**read_description(copy), "layers": {}})
    path = {"checkpoint": tiny_checkpoint, "rtn": rtn_output}.get(kind, tmp_path / kind)
    code, stdout, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / kind / HEATMAP_FILE).exists()
