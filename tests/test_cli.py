"""The command line: happy paths on a tiny checkpoint, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    (["quantize", "{tiny}", "--out", "/proc/forbidden/out"], "cannot be written"),
    (["quantize", "{tiny}", "--method", "rtn", "--layout", "row", "--out", "{out}"],
     "--layout applies to --method cmpq only"),
    (["quantize", "{tiny}", "--include-lm-head", "--out", "{out}"],
     "--include-lm-head applies to --method rtn only"),
    (["quantize", "{tiny}", "--allocation", "rd", "--layout", "row", "--out", "{out}"],
     "--allocation rd prices each input column alone: use --layout column"),
    (["eval", "{tiny}", "--seqlen", "100000"],
     "--seqlen 100000 is longer than the model's context"),
    (["quantize", "{tiny}", "--device", "tpu", "--out", "{out}"], "--device must be one of"),
    (["quantize", "{tiny}", "--resume", "--out", "{out}"], "no unfinished run to continue"),
    (["quantize", "{tiny}", "--max-shard-size", "lots", "--out", "{out}"], "size"),
]  # fmt: skip
if not torch.cuda.is_available():
    BAD_INPUTS += [
        (["quantize", "{tiny}", "--device", "cuda", "--out", "{out}"], "no CUDA GPU is available"),
        (["quantize", "{tiny}", "--device", "cuda:1", "--out", "{out}"], "no CUDA GPU"),
    ]


def test_a_sharded_output_written_block_by_block_evaluates(
    capsys, tmp_path, tiny_checkpoint, text_file
):
    out = tmp_path / "q"
    code, _, err = run_cli(
        capsys, "quantize", str(tiny_checkpoint), "--bits", "3", "--calib", str(text_file),
        "--calib-samples", "4", "--calib-seqlen", "16", "--max-shard-size", "20KB",
        "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists()
    code, stdout, _ = run_cli(
        capsys, "eval", str(out), "--dataset", str(text_file), "--seqlen", "16", "--windows", "2"
    )
    assert code == 0 and "perplexity" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--no-plot")
    assert code == 0 and "q_proj" in stdout


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
    # no outliers at 4.5 bits to fill the last fraction of a bit: a tiny model's widths
    # move a whole column (about 0.1 bits here) at a time, and rd-layer sets aside the
    # metadata of up to 7 groups a layer (another 0.1 here; 0.004 on smollm2-135m)
    assert 4.3 <= payload["effective_bits"] <= 4.5
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
    # ~3 bits: outliers fill what the widths leave (from 4 bits there are none, and a tiny
    # model's widths alone land a few percent under)
    budget = unquantized_bytes(model) + header_bytes(model, 10**6) + params * 3 // 8
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
    assert 2.9 <= payload["effective_bits"] <= 3.1


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


def test_an_unwritable_out_fails_before_the_model_loads(capsys, monkeypatch, tiny_checkpoint):
    def never(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cmpq.cli.load_model", never)
    code, _, err = run_cli(capsys, "quantize", str(tiny_checkpoint), "--out", "/proc/forbidden")
    assert code == 2 and "cannot be written" in err


def test_too_little_disk_fails_before_quantizing(capsys, monkeypatch, tmp_path, tiny_checkpoint):
    import shutil

    def never(*args, **kwargs):
        raise AssertionError("quantization ran")

    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr("cmpq.format.checkpoint.shutil.disk_usage", lambda path: usage)
    monkeypatch.setattr("cmpq.cli.quantize", never)
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_checkpoint), "--out", str(out))
    assert code == 2
    assert "0.0 MB free, the output needs about" in err.strip().splitlines()[-1]
    assert not out.exists()


def full_disk(tensors, path, metadata=None):
    """``safetensors.torch.save_file`` on a disk that fills up mid-write."""
    from safetensors import SafetensorError

    Path(path).write_bytes(b"partial")
    raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")


QUICK_CMPQ = ("--bits", "4", "--calib-samples", "2", "--calib-seqlen", "16")  # streamed


def test_a_disk_that_fills_up_while_writing_a_block_keeps_the_work(
    capsys, monkeypatch, tmp_path, tiny_checkpoint
):
    monkeypatch.setattr("cmpq.runtime.checkpoint.save_file", full_disk)
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_checkpoint), *QUICK_CMPQ, "--out", str(out))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "the disk filled up while writing block 0" in last
    assert "run again with --resume" in err
    assert list(tmp_path.iterdir()) == [tmp_path / ".q.partial"]  # no output; the work is kept
    monkeypatch.undo()
    argv = ("quantize", str(tiny_checkpoint), *QUICK_CMPQ, "--out", str(out), "--resume")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert sorted(tmp_path.iterdir()) == [out]  # the work directory is gone once done


def test_the_final_write_on_a_full_disk_leaves_no_output(
    capsys, monkeypatch, tmp_path, tiny_checkpoint
):
    monkeypatch.setattr("cmpq.format.shards.save_file", full_disk)
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_checkpoint), *QUICK_CMPQ, "--out", str(out))
    assert code == 2
    assert "--out " in err and "the disk filled up while writing; nothing was written" in err
    assert list(tmp_path.iterdir()) == [tmp_path / ".q.partial"]  # no output or staging


def test_every_config_field_is_an_option_and_the_defaults_are_the_configs(tiny_checkpoint):
    import dataclasses

    from cmpq.cli import build_parser, config_from_args
    from cmpq.config import CMPQConfig, RTNConfig

    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices["quantize"].format_help()
    for config in (CMPQConfig, RTNConfig):
        for field in dataclasses.fields(config):
            flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
            assert flag in text, flag
    for method, config in (("cmpq", CMPQConfig()), ("rtn", RTNConfig())):
        args = parser.parse_args(["quantize", "m", "--out", "o", "--method", method])
        assert config_from_args(args) == config
    args = parser.parse_args(
        ["quantize", "m", "--out", "o", "--integer-only", "--no-error-feedback", "--bits", "3"]
    )
    assert config_from_args(args) == CMPQConfig(bits=3.0, mixed=False, error_feedback=False)
    args = parser.parse_args(["quantize", "m", "--out", "o", "--method", "rtn", "--bits", "4",
                              "--group-size", "channel"])  # fmt: skip
    assert config_from_args(args) == RTNConfig(bits=4, group_size=None)


def test_outlier_fractions_follow_the_budget_unless_given():
    from cmpq.cli import build_parser, config_from_args
    from cmpq.config import CMPQConfig, default_outlier_fractions

    assert default_outlier_fractions(2.0) == default_outlier_fractions(2.5) == (0.0005, 0.004)
    assert CMPQConfig(bits=2.2).outlier_fractions == (0.0005, 0.004)
    assert default_outlier_fractions(3.0) == pytest.approx((0.0005, 0.001))
    assert default_outlier_fractions(3.5) == pytest.approx((0.00025, 0.0005))
    assert default_outlier_fractions(4.0) == default_outlier_fractions(8.0) == (0.0, 0.0)
    totals = [sum(default_outlier_fractions(tenths / 10)) for tenths in range(20, 81)]
    assert totals == sorted(totals, reverse=True)  # never more outliers for more bits
    assert CMPQConfig(bits=4.5, outliers_q=0.002).outlier_fractions == (0.0, 0.002)
    args = build_parser().parse_args(
        ["quantize", "m", "--out", "o", "--outliers-q", "auto", "--outliers-act", "0.001"]
    )
    assert config_from_args(args) == CMPQConfig(outliers_act=0.001)
    assert config_from_args(args).outlier_fractions == (0.001, 0.004)


def test_model_tuning_follows_the_budget_and_where_the_model_is_unless_given():
    from cmpq.cli import build_parser, config_from_args
    from cmpq.config import PAPER_METHOD, CMPQConfig

    budgets = (2.0, 2.49, 2.5, 3.0, 3.5, 3.6, 4.5)
    steps = {
        (bits, whole): CMPQConfig(bits=bits).with_model_tuning(whole).tune_model
        for bits in budgets
        for whole in (True, False)
    }
    assert [steps[bits, True] for bits in budgets] == [120, 120, 60, 60, 60, 0, 0]
    assert not any(steps[bits, False] for bits in (2.0, 2.5, 3.5))  # streamed: never
    assert CMPQConfig(bits=4.0, tune_model=5).with_model_tuning(False).tune_model == 5
    assert CMPQConfig(bits=2.0, **PAPER_METHOD).with_model_tuning(True).tune_model == 0
    parser = build_parser()
    auto = parser.parse_args(["quantize", "m", "--out", "o", "--tune-model", "auto"])
    assert config_from_args(auto) == CMPQConfig()
    off = parser.parse_args(["quantize", "m", "--out", "o", "--tune-model", "0"])
    assert config_from_args(off).with_model_tuning(True).tune_model == 0


def test_the_budget_decides_whether_outliers_are_stored():
    from cmpq.api import quantize
    from cmpq.config import CMPQConfig

    from tiny import make_tiny_model, tiny_batch

    batch = tiny_batch(4, 24)
    stored = {}
    for bits in (2.5, 4.0):
        config = CMPQConfig(bits=bits, kmeans_iters=2)
        report = quantize(make_tiny_model("llama"), config, calibration=batch, progress=False)
        stored[bits] = report.bits_breakdown["outliers"]
    assert stored[2.5] > 0.02 and stored[4.0] == 0


def test_library_messages_name_parameters_and_the_cli_prints_flags():
    from cmpq.cli import in_cli_words
    from cmpq.config import CMPQConfig
    from cmpq.errors import CmpqError

    with pytest.raises(CmpqError) as caught:
        CMPQConfig(outliers_act=0.5)
    assert str(caught.value).startswith("`outliers_act` must be a fraction")
    assert in_cli_words(str(caught.value)).startswith("--outliers-act must be a fraction")
    assert (
        in_cli_words("`bits` 3 is 3 total bits; `stats` too")
        == "--bits 3 is 3 total bits; stats too"
    )


def test_demo_on_a_tiny_model(capsys, tiny_checkpoint, text_file):
    code, stdout, err = run_cli(
        capsys, "demo", "--model", str(tiny_checkpoint), "--dataset", str(text_file),
        "--seqlen", "16", "--windows", "4", "--bits", "3",
    )  # fmt: skip
    assert code == 0, err
    rows = {}
    for line in stdout.splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and parts[0] in (
            "full precision (fp32)",
            "RTN 3-bit g64",
            "CMPQ 3 bits",
        ):
            rows[parts[0]] = [float(value) for value in parts[1:]]
    assert set(rows) == {"full precision (fp32)", "RTN 3-bit g64", "CMPQ 3 bits"}
    assert rows["full precision (fp32)"][0] == 32.0
    # 3-bit codes + 32 bits per group of 64: 3.53 on these layers (down_proj's 96-wide rows
    # end in a partial group, counted whole)
    assert rows["RTN 3-bit g64"][0] == 3.53
    assert 2.9 <= rows["CMPQ 3 bits"][0] <= 3.0
    for _, megabytes, ppl in rows.values():
        assert ppl > 1 and megabytes > 0
    assert "demo took" in stdout


def test_the_demo_cites_the_committed_calibration_measurements():
    from cmpq.cli import DEMO_CALIB_SAMPLES, DEMO_CALIBRATION, demo_calibration_note

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    rows = json.loads((results / "calibration-smollm2-135m.json").read_text())["rows"]
    measured = {r["calib_samples"]: r for r in rows if r["bits"] == DEMO_CALIBRATION["bits"]}
    assert {DEMO_CALIB_SAMPLES, 128} <= set(DEMO_CALIBRATION["ppl"])
    for samples, ppl in DEMO_CALIBRATION["ppl"].items():
        assert measured[samples]["commit"] == DEMO_CALIBRATION["commit"]
        assert round(measured[samples]["ppl"], 2) == ppl
        assert round(measured[samples]["quantize_seconds"]) == DEMO_CALIBRATION["seconds"][samples]
    note = demo_calibration_note("smollm2-135m", 2.5, DEMO_CALIB_SAMPLES)
    assert f"{DEMO_CALIBRATION['ppl'][128]:.2f} with 128" in note
    assert demo_calibration_note("other-model", 2.5, 16).endswith(
        "uses 128 and 60 steps of model tuning)."
    )
    assert demo_calibration_note("other-model", 4.0, 16).endswith("uses 128).")  # untuned


def test_with_model_tuning_the_auto_outliers_stay_the_paper_s_to_3_3_bits():
    from cmpq.config import PAPER_OUTLIERS, CMPQConfig, default_outlier_fractions

    paper = (PAPER_OUTLIERS["outliers_act"], PAPER_OUTLIERS["outliers_q"])
    assert default_outlier_fractions(3.0, tuned=True) == default_outlier_fractions(3.3, tuned=True)
    assert default_outlier_fractions(3.3, tuned=True) == paper
    assert default_outlier_fractions(3.0) == pytest.approx((0.0005, 0.001))
    assert sum(default_outlier_fractions(3.65, tuned=True)) == pytest.approx(sum(paper) / 2)
    assert default_outlier_fractions(4.0, tuned=True) == (0.0, 0.0)
    assert CMPQConfig(bits=3.0).with_model_tuning(whole=True).outlier_fractions == paper
    streamed = CMPQConfig(bits=3.0).with_model_tuning(whole=False)
    assert streamed.outlier_fractions == pytest.approx((0.0005, 0.001))
    assert CMPQConfig(bits=3.0, outliers_q=0.002, tune_model=60).outlier_fractions[1] == 0.002
