"""Quantizing a checkpoint one block at a time: the same bytes as in memory, one
block's weights materialised, resumable after a kill, sharded outputs that load."""

import filecmp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cmpq.calib.looper import SpillFiles
from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.format.shards import INDEX_FILE, weight_files
from cmpq.models.graph import decoder_blocks
from cmpq.models.sources import load_pretrained
from cmpq.models.streaming import CheckpointBlocks, open_streamed
from cmpq.quant import pipeline
from cmpq.quant.pipeline import quantize
from cmpq.quant.streamed import quantize_streamed, work_directory
from cmpq.runtime.checkpoint import load_quantized, save_quantized

from tiny import make_tiny_model, make_tiny_tokenizer, tiny_batch

SHARD = 20_000  # bytes: a tiny model's output in several shards
CONFIG = CMPQConfig(bits=3.3, kmeans_iters=5, tune_model=0)  # streamed runs never tune


def save_checkpoint(path: Path, arch: str) -> Path:
    make_tiny_model(arch).save_pretrained(path, max_shard_size="20KB")  # sharded input too
    make_tiny_tokenizer().save_pretrained(path)
    return path


def same_files(a: Path, b: Path) -> list[str]:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {}),
        ("gemma3", {}),
        ("opt", {"allocation": "rd", "bits": 2.7}),
        ("gpt2", {"allocation": "paper", "sequential": True}),
        ("qwen2", {"error_feedback": False}),
        ("llama", {"sequential": True}),  # rd-layer + error feedback, sequential
        ("mistral", {"tune_tables": 4}),  # tables tuned to each block's outputs
    ],
)
def test_streamed_output_equals_the_in_memory_output_byte_for_byte(tmp_path, arch, options):
    source = save_checkpoint(tmp_path / "source", arch)
    # tune_model 0: a streamed run is never model-tuned (auto tunes a model held whole)
    config = CMPQConfig(**{"bits": 3.3, "kmeans_iters": 5, "tune_model": 0, **options})
    batch = tiny_batch(4, 24)
    model, tokenizer = load_pretrained(str(source))
    report = quantize(model, config, calibration=batch, progress=False)
    save_quantized(model, tokenizer, report, tmp_path / "memory", max_shard_size=SHARD)
    streamed = open_streamed(source)
    streamed_report = quantize_streamed(
        streamed, config, tmp_path / "streamed", max_shard_size=SHARD, calibration=batch,
        progress=False,
    )  # fmt: skip
    assert (tmp_path / "streamed" / INDEX_FILE).exists()
    assert len(weight_files(tmp_path / "streamed")) >= 2
    assert same_files(tmp_path / "memory", tmp_path / "streamed") == []
    assert streamed_report.stored_dict() == report.stored_dict()
    assert not work_directory(tmp_path / "streamed").exists()


def test_gram_matrices_recomputed_or_kept_on_disk_give_the_same_model(monkeypatch):
    batch = tiny_batch(4, 24)
    states = []
    for share in (0.5, 0.0):  # 0: no room on disk, pass 2 runs calibration again
        monkeypatch.setattr(pipeline, "GRAM_DISK_SHARE", share)
        model = make_tiny_model("llama")
        quantize(model, CONFIG, calibration=batch, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_at_most_one_block_is_materialised_at_a_time(tmp_path, monkeypatch):
    source = save_checkpoint(tmp_path / "source", "llama")
    streamed = open_streamed(source)
    _, blocks = decoder_blocks(streamed.model)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # nothing read yet
    seen = []
    load, release = CheckpointBlocks.load, CheckpointBlocks.release

    def materialised() -> list[int]:
        return [i for i, b in enumerate(blocks) if any(not p.is_meta for p in b.parameters())]

    def loading(self, index, block):
        load(self, index, block)
        seen.append(materialised())

    def releasing(self, index, block):
        release(self, index, block)
        assert materialised() == []

    monkeypatch.setattr(CheckpointBlocks, "load", loading)
    monkeypatch.setattr(CheckpointBlocks, "release", releasing)
    quantize_streamed(streamed, CONFIG, tmp_path / "q", calibration=tiny_batch(4, 24),
                      progress=False)  # fmt: skip
    assert seen == [[0], [1], [0], [1]]  # measure, then quantize: one block each time
    head = streamed.model.get_output_embeddings().weight
    assert head.is_meta or head is streamed.model.get_input_embeddings().weight


RUN = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from cmpq.config import CMPQConfig
    from cmpq.models.streaming import open_streamed
    from cmpq.quant import pipeline
    from cmpq.quant.streamed import quantize_streamed
    from tiny import tiny_batch

    quantize_block = pipeline._Run.quantize_block

    def slow(self, index, block, measured):
        quantize_block(self, index, block, measured)
        print("done", index, flush=True)
        time.sleep(float(os.environ.get("PAUSE", "0")))

    pipeline._Run.quantize_block = slow
    streamed = open_streamed({source!r})
    quantize_streamed(
        streamed, CMPQConfig(bits=3.3, kmeans_iters=5), {out!r}, resume=len(sys.argv) > 1,
        calibration=tiny_batch(4, 24), progress=False,
    )
    print("finished", flush=True)
    """
)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    source = save_checkpoint(tmp_path / "source", "llama")
    tests = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=tests, source=str(source), out=str(tmp_path / "killed")))
    env = {**os.environ, "PAUSE": "30"}
    command = [sys.executable, str(script)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert run.stdout.readline().split() == ["done", "0"]
    run.send_signal(signal.SIGKILL)  # mid-run: block 0 written, block 1 not
    run.wait()
    partial = work_directory(tmp_path / "killed")
    assert (partial / "blocks" / "block-00000.safetensors").exists()
    assert not (tmp_path / "killed").exists()
    resumed = subprocess.run(
        [sys.executable, str(script), "resume"], capture_output=True, text=True,
        env={**os.environ, "PAUSE": "0"}, check=True,
    )  # fmt: skip
    assert resumed.stdout.split() == ["done", "1", "finished"]  # block 0 was not redone
    script.write_text(RUN.format(tests=tests, source=str(source), out=str(tmp_path / "whole")))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True)
    assert same_files(tmp_path / "killed", tmp_path / "whole") == []


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    source = save_checkpoint(tmp_path / "source", "llama")
    streamed = open_streamed(source)
    work_directory(tmp_path / "q").mkdir()
    quantize_streamed(streamed, CONFIG, tmp_path / "q", calibration=tiny_batch(4, 24),
                      progress=False, resume=True)  # fmt: skip
    streamed = open_streamed(source)
    with pytest.raises(CmpqError, match="no unfinished run"):
        quantize_streamed(streamed, CONFIG, tmp_path / "r", resume=True, progress=False)
    from cmpq.quant.workdir import WorkDir

    WorkDir(work_directory(tmp_path / "s")).check_run({"config": "another"})
    with pytest.raises(CmpqError, match="holds a run with other settings"):
        quantize_streamed(streamed, CONFIG, tmp_path / "s", calibration=tiny_batch(4, 24),
                          progress=False, resume=True)  # fmt: skip


def test_sharded_outputs_load_and_save_pretrained_shards_round_trip(tmp_path):
    source = save_checkpoint(tmp_path / "source", "qwen2")
    model, tokenizer = load_pretrained(str(source))
    report = quantize(model, CONFIG, calibration=tiny_batch(4, 24), progress=False)
    save_quantized(model, tokenizer, report, tmp_path / "one")
    save_quantized(model, tokenizer, report, tmp_path / "sharded", max_shard_size=SHARD)
    assert [f.name for f in weight_files(tmp_path / "one")] == ["model.safetensors"]
    window = tiny_batch(1, 16, seed=3)
    one, _ = load_quantized(tmp_path / "one", embedding_dtype="float32")
    sharded, _ = load_quantized(tmp_path / "sharded", embedding_dtype="float32")
    sharded.save_pretrained(tmp_path / "resaved", max_shard_size="20KB")
    assert len(weight_files(tmp_path / "resaved")) > 2
    resaved, _ = load_quantized(tmp_path / "resaved", embedding_dtype="float32",
                                with_tokenizer=False)  # fmt: skip
    with torch.no_grad():
        expected = model(window).logits
        for loaded in (one, sharded, resaved):
            torch.testing.assert_close(loaded(window).logits, expected, rtol=0, atol=0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here"))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_quantizing_on_a_device_leaves_the_model_on_the_cpu(device):
    batch = tiny_batch(4, 24)
    reference = make_tiny_model("llama")
    quantize(reference, CONFIG, calibration=batch, progress=False)
    model = make_tiny_model("llama")
    report = quantize(model, CONFIG, calibration=batch, progress=False, device=device)
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert 3.2 <= report.effective_bits <= 3.3
    window = tiny_batch(1, 16, seed=3)
    with torch.no_grad():
        expected, got = reference(window).logits, model(window).logits
    if device == "cpu":  # the same work: the same model
        assert torch.equal(expected, got)
    else:  # other kernels, other rounding: about the same model
        assert (expected - got).norm() <= 0.05 * expected.norm()


def test_hidden_states_in_bfloat16_give_about_the_same_model():
    batch = tiny_batch(4, 24)
    models = {}
    for dtype in ("float32", "bfloat16"):
        models[dtype] = make_tiny_model("llama")
        quantize(models[dtype], CONFIG, calibration=batch, progress=False, hidden_dtype=dtype)
    window = tiny_batch(1, 16, seed=3)
    with torch.no_grad():
        exact, rounded = (models[d](window).logits for d in ("float32", "bfloat16"))
    assert not torch.equal(exact, rounded)  # the calibration inputs were rounded ...
    assert (exact - rounded).norm() <= 0.1 * exact.norm()  # ... and the model barely moved
    with pytest.raises(CmpqError, match="`hidden_dtype` must be one of"):
        quantize(make_tiny_model("llama"), CONFIG, calibration=batch, hidden_dtype="int8")


SEQUENTIAL_PAPER = CMPQConfig(
    bits=3.3, kmeans_iters=5, tune_model=0, sequential=True, allocation="paper"
)


@pytest.mark.parametrize("config", [CONFIG, SEQUENTIAL_PAPER])
def test_hidden_states_spilled_to_files_give_the_same_model(monkeypatch, config):
    batch = tiny_batch(4, 24)
    spilled_windows = []
    original_windows = SpillFiles.windows

    def windows(self, like, count, dtype):
        made = original_windows(self, like, count, dtype)
        spilled_windows.extend(made)
        return made

    monkeypatch.setattr(SpillFiles, "windows", windows)
    states = []
    for share in (0.25, 0.0):  # 0: the hidden states never fit in memory
        monkeypatch.setattr(pipeline, "HIDDEN_MEMORY_SHARE", share)
        model = make_tiny_model("llama")
        quantize(model, config, calibration=batch, progress=False)
        states.append(model.state_dict())
        assert bool(spilled_windows) == (share == 0.0)
    # every window lived in a file-backed mapping, one file per block's outputs
    assert all(w.untyped_storage().filename for w in spilled_windows)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_stored_gram_matrices_read_back_exactly(tmp_path):
    from cmpq.calib.stats import ChannelStats
    from cmpq.quant.workdir import WorkDir

    shared = ChannelStats.zeros(5, gram=True)
    shared.gram.copy_(
        torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    own = ChannelStats.zeros(3, gram=True)
    own.gram.copy_(torch.arange(9, dtype=torch.float64).view(3, 3))
    workdir = WorkDir(tmp_path)
    workdir.save_grams(0, {"q": shared, "k": shared, "down": own})
    stored = workdir.gram_loaders(0)
    assert stored["q"] is stored["k"] and stored["q"] is not stored["down"]
    order = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(stored["q"].diagonal(), shared.gram.diagonal())
    assert torch.equal(stored["q"].permuted(order), shared.gram[order[:, None], order])
    assert torch.equal(
        stored["down"].diagonal(), torch.tensor([0.0, 4.0, 8.0], dtype=torch.float64)
    )
    whole = workdir.gram_loaders(0, local=False)  # for tasks on other machines: the tensors
    assert torch.equal(whole["k"], shared.gram) and whole["q"] is whole["k"]


@pytest.mark.parametrize(
    ("bits", "memory", "resume", "tuned"),
    [
        (2.5, None, False, True),  # fits: held whole and tuned
        (4.0, None, False, False),  # above 3.5 bits: streamed, not tuned
        (2.5, 0, False, False),  # tuning whole would not fit: streamed instead
        (2.5, None, True, False),  # resume continues a streamed run
    ],
)
def test_auto_model_tuning_holds_the_model_whole_only_when_it_pays_and_fits(
    tmp_path, monkeypatch, bits, memory, resume, tuned
):
    from cmpq import api

    source = save_checkpoint(tmp_path / "source", "llama")
    if memory is not None:
        monkeypatch.setattr(api, "available_memory_bytes", lambda: memory)
    streamed_runs = []
    quantize_streamed_spy = api.quantize_streamed

    def spy(streamed, config, *args, **kwargs):
        streamed_runs.append(config)
        return quantize_streamed_spy(streamed, config, *args, **kwargs)

    monkeypatch.setattr(api, "quantize_streamed", spy)
    if resume:
        work_directory(tmp_path / "q").mkdir()
    config = CMPQConfig(bits=bits, kmeans_iters=5, calib_samples=4, calib_seqlen=24)
    report = api.quantize_checkpoint(
        str(source), tmp_path / "q", config, resume=resume, progress=False
    )
    assert report.config["tune_model"] == (60 if tuned else 0)
    assert ("model" in report.tuning) == tuned
    assert len(streamed_runs) == (0 if tuned else 1)
    if tuned:
        assert report.tuning["model"]["steps"] == 60


def test_rd_fisher_loads_a_checkpoint_whole_and_cannot_resume(tmp_path, monkeypatch):
    from cmpq import api

    source = save_checkpoint(tmp_path / "source", "llama")
    streamed_runs = []
    monkeypatch.setattr(api, "quantize_streamed", lambda *a, **k: streamed_runs.append(a))
    config = CMPQConfig(
        bits=3.0, allocation="rd-fisher", tune_model=0, kmeans_iters=5, calib_samples=4,
        calib_seqlen=24,
    )  # fmt: skip
    report = api.quantize_checkpoint(str(source), tmp_path / "q", config, progress=False)
    assert not streamed_runs and report.config["allocation"] == "rd-fisher"
    assert report.effective_bits <= 3.0
    work_directory(tmp_path / "r").mkdir()
    with pytest.raises(CmpqError, match="`resume` cannot continue .* rd-fisher"):
        api.quantize_checkpoint(str(source), tmp_path / "r", config, resume=True, progress=False)
