"""The command line: happy paths on a tiny checkpoint, and every bad input."""

import json
import subprocess
import sys

import pytest

from cmpq.cli import main
from cmpq.format.description import read_description
from cmpq.format.spec import FORMAT_VERSION


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_then_eval_a_local_checkpoint(capsys, tmp_path, tiny_checkpoint, text_file):
    out, report = tmp_path / "q", tmp_path / "report.json"
    code, stdout, _ = run_cli(
        capsys,
        "quantize",
        str(tiny_checkpoint),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--out",
        str(out),
        "--json",
        str(report),
    )
    assert code == 0, stdout
    payload = json.loads(report.read_text())
    assert payload["effective_bits"] == pytest.approx(5.0)  # 4 + 32 bits per 32 weights
    assert payload["bits_breakdown"] == {"codes": 4.0, "scales": 1.0}
    description = json.loads((out / "cmpq.json").read_text())
    assert description["method"] == "rtn" and description["format_version"] == FORMAT_VERSION
    assert description["format"] == "dequantized"

    result = tmp_path / "eval.json"
    code, stdout, _ = run_cli(
        capsys,
        "eval",
        str(out),
        "--dataset",
        str(text_file),
        "--seqlen",
        "16",
        "--windows",
        "3",
        "--json",
        str(result),
    )
    assert code == 0
    row = json.loads(result.read_text())
    assert (row["windows"], row["seqlen"], row["tokens"]) == (3, 16, 45)
    assert f"perplexity {row['ppl']:.4f}" in stdout


BAD_INPUTS = [
    (["eval", "no-such-alias-or-path"], "unknown model 'no-such-alias-or-path'"),
    (["eval", "./missing/model"], "does not exist"),
    (["eval", "{text_file}"], "is not a model"),
    (["eval", "{bad_gguf}"], "could not load a model"),
    (["eval", "{tiny}", "--dataset", "/no/such/file.txt"], "neither a built-in dataset"),
    (["eval", "{tiny}", "--dataset", "{empty_file}"], "is empty"),
    (
        ["eval", "{tiny}", "--dataset", "{text_file}", "--seqlen", "64", "--windows", "500"],
        "room for",
    ),
    (
        ["quantize", "{tiny}", "--method", "rtn", "--bits", "9", "--out", "{out}"],
        "integer from 2 to 8",
    ),
    (
        ["quantize", "{tiny}", "--method", "rtn", "--bits", "1", "--out", "{out}"],
        "integer from 2 to 8",
    ),
    (["quantize", "{tiny}", "--method", "rtn", "--group-size", "0", "--out", "{out}"], "positive"),
    (["quantize", "{tiny}", "--method", "rtn", "--group-size", "-8", "--out", "{out}"], "positive"),
    (["quantize", "{tiny}", "--bits", "1.5", "--out", "{out}"], "from 2 to 8 total bits"),
    (["quantize", "{tiny}", "--bits", "8.5", "--out", "{out}"], "from 2 to 8 total bits"),
    (["quantize", "{tiny}", "--outliers-q", "0.5", "--out", "{out}"], "fraction from 0 to 0.1"),
    (
        ["quantize", "{tiny}", "--calib", "/no/such.jsonl", "--out", "{out}"],
        "neither a built-in dataset",
    ),
    (["quantize", "{tiny}", "--damp", "0", "--out", "{out}"], "--damp must be in (0, 1]"),
    (["quantize", "{tiny}", "--out", "{nonempty}"], "not empty; pass --overwrite"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_gives_one_clear_line(
    capsys, monkeypatch, tmp_path, tiny_checkpoint, text_file, argv, message
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "broken.gguf").write_text("not a gguf file")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("precious")
    values = {
        "tiny": tiny_checkpoint,
        "text_file": text_file,
        "bad_gguf": tmp_path / "broken.gguf",
        "empty_file": tmp_path / "empty.txt",
        "out": tmp_path / "out",
        "nonempty": tmp_path / "nonempty",
    }
    code, _, err = run_cli(capsys, *[arg.format(**values) for arg in argv])
    assert code == 2
    last_line = err.strip().splitlines()[-1]  # progress bars may come before it
    assert last_line.startswith("error: ") and message in last_line
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no partial output
    assert (tmp_path / "nonempty" / "keep.txt").read_text() == "precious"


def test_hub_id_without_network_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = run_cli(capsys, "eval", "some-org/some-model")
    assert code == 2
    assert "hub is not reachable" in err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "cmpq.cli", "eval", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "Traceback" not in process.stderr


def test_cmpq_quantize_writes_a_packed_model_that_evaluates(
    capsys, tmp_path, tiny_checkpoint, text_file
):
    out, report = tmp_path / "q", tmp_path / "report.json"
    code, stdout, err = run_cli(
        capsys,
        "quantize",
        str(tiny_checkpoint),
        "--bits",
        "4.5",
        "--calib",
        str(text_file),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--out",
        str(out),
        "--json",
        str(report),
    )
    assert code == 0, err
    payload = json.loads(report.read_text())
    assert 4.49 <= payload["effective_bits"] <= 4.5
    assert set(payload["bits_breakdown"]) == {"codes", "lut", "outliers", "metadata"}
    assert payload["stored_bytes"] * 8 >= payload["effective_bits"] * payload["quantized_params"]
    assert read_description(out)["format"] == "packed"
    code, stdout, _ = run_cli(
        capsys, "eval", str(out), "--dataset", str(text_file), "--seqlen", "16", "--windows", "2"
    )
    assert code == 0 and "perplexity" in stdout


def test_max_size_fills_the_byte_budget(capsys, tmp_path, tiny_checkpoint, text_file):
    from cmpq.alloc.size import header_bytes, unquantized_bytes
    from cmpq.api import load_model
    from cmpq.models.graph import quantizable_linears

    model, _ = load_model(str(tiny_checkpoint))
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    budget = unquantized_bytes(model) + header_bytes(model, 10**6) + params * 4 // 8  # ~4 bits
    out, report = tmp_path / "q", tmp_path / "report.json"
    code, stdout, err = run_cli(
        capsys, "quantize", str(tiny_checkpoint), "--max-size", str(budget),
        "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32",
        "--out", str(out), "--json", str(report),
    )  # fmt: skip
    assert code == 0, err
    size = (out / "model.safetensors").stat().st_size
    payload = json.loads(report.read_text())
    assert payload["model_bytes"] == size and payload["max_bytes"] == budget
    assert 0.97 * budget <= size <= budget
    assert 3.9 <= payload["effective_bits"] <= 4.1


@pytest.mark.parametrize(
    ("size", "message"),
    [("12XB", "a size such as 60MB"), ("1KB", "cannot hold this model"), ("0", "positive")],
)
def test_bad_max_size_is_a_clear_error(capsys, tmp_path, tiny_checkpoint, size, message):
    code, _, err = run_cli(
        capsys, "quantize", str(tiny_checkpoint), "--max-size", size, "--out", str(tmp_path / "o")
    )
    assert code == 2 and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_max_size_and_bits_together_are_refused(capsys, tmp_path, tiny_checkpoint):
    code, _, err = run_cli(
        capsys, "quantize", str(tiny_checkpoint), "--max-size", "1MB", "--bits", "3",
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2 and "replaces --bits" in err
