"""How quantization scales: memory and time against the model's depth and size.

    python benchmarks/scale_bench.py synthetic [--blocks 1 2 4 8] [--samples 16] [--seqlen 512]
    python benchmarks/scale_bench.py smollm2 [--bits 2.5 3.0 4.5] [--before a9d9259]
        [--codes before after]

``synthetic``: random-weight Llama models at Llama-3-8B width (hidden 4096, MLP
14336, 32 heads, 8 key-value heads, vocabulary 32000) with 1, 2, 4 and 8
blocks, saved once into the cache as sharded bf16 safetensors (1 GB shards),
each quantized by ``cmpq quantize DIR`` with every default but a short
calibration (``--calib-samples 16 --calib-seqlen 512``). The vocabulary is a
32000-token byte-level BPE trained on the bundled C4 train text (the
calibration text goes through it). For each: peak RSS of the process, wall
time, quantization time per block and per weight, and the bytes written.
Writes benchmarks/results/scale-synthetic.{json,md,png}.

``smollm2``: ``cmpq quantize smollm2-135m --bits B`` (every default) at this
commit and at ``--before`` (a git worktree of that commit, run with this
environment), time and peak RSS; the model already in the cache. Writes
benchmarks/results/scale-smollm2-135m.{json,md,png}.

Every run is a child process (``cmpq`` as a user runs it); its peak RSS is the
child's own ``ru_maxrss`` (``wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results import ROOT, ResultsFile, commit_of, run_child

WIDTH = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
SYNTHETIC_STEM = "scale-synthetic"
SMOLLM2_STEM = "scale-smollm2-135m"


def cache() -> Path:
    from cmpq.models.sources import cache_dir

    return cache_dir() / "scale-bench"


def train_tokenizer(path: Path) -> None:
    """A 32000-token byte-level BPE trained on the bundled C4 train text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cmpq.calib.text import load_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=WIDTH["vocab_size"],
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(load_documents("c4-train"), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(path)


def synthetic_checkpoint(blocks: int) -> Path:
    """The random-weight 8B-wide Llama with ``blocks`` blocks, built once (bf16, 1 GB
    shards, seed 0), with the trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = cache() / f"llama8b-width-{blocks}-blocks"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(**WIDTH, num_hidden_layers=blocks, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    staging = path.with_name(path.name + ".partial")
    model.save_pretrained(staging, max_shard_size="1GB")
    train_tokenizer(staging)
    staging.rename(path)
    return path


def run_cmpq(argv: list[str], env: dict | None = None) -> tuple[dict, float, int]:
    """``cmpq quantize argv --json ...`` in a child: its report, wall seconds, peak RSS."""
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        quantize = [sys.executable, "-m", "cmpq.cli", "quantize", *argv]
        done = run_child([*quantize, "--json", str(report_path)], env)
        if done.returncode != 0:
            raise SystemExit(f"cmpq quantize {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        return json.loads(report_path.read_text()), done.seconds, done.peak_rss_bytes


def output_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def bench_synthetic(blocks_list: list[int], samples: int, seqlen: int) -> None:
    blocks = " ".join(map(str, blocks_list))
    command = (
        f"python benchmarks/scale_bench.py synthetic --blocks {blocks} --samples {samples} "
        f"--seqlen {seqlen}"
    )
    results = ResultsFile.open(SYNTHETIC_STEM, command)
    for blocks in blocks_list:
        source = synthetic_checkpoint(blocks)
        with tempfile.TemporaryDirectory(dir=cache()) as scratch:
            out = Path(scratch) / "q"
            argv = [str(source), "--calib-samples", str(samples), "--calib-seqlen", str(seqlen),
                    "--out", str(out)]  # fmt: skip
            report, seconds, peak = run_cmpq(argv)
            written = output_bytes(out)
        params = report["quantized_params"]
        total_params = params + 2 * WIDTH["vocab_size"] * WIDTH["hidden_size"]
        row = ResultsFile.stamp(
            {
                "model": f"llama8b-width-{blocks}-blocks",
                "blocks": blocks,
                "quantized_params": params,
                "fp32_bytes": 4 * total_params,
                "wall_seconds": seconds,
                "quantize_seconds": report["seconds"],
                "peak_rss_bytes": peak,
                "bytes_written": written,
                "effective_bits": report["effective_bits"],
            },
            report["config"],
        )
        results.rows = [r for r in results.rows if r.get("blocks") != blocks] + [row]
        write_synthetic(results)


def write_synthetic(results: ResultsFile) -> None:
    rows = sorted(results.rows, key=lambda r: r["blocks"])
    lines = [
        "Random-weight Llama at Llama-3-8B width (hidden 4096, MLP 14336, 32 heads, 8 key-value "
        "heads, vocabulary 32000), bf16 safetensors in 1 GB shards; `cmpq quantize DIR` with "
        "every default (2.5 bits, rd-layer, error feedback) and a short calibration.",
        "",
        "| blocks | commit | quantized weights | fp32 model | peak RSS | peak / fp32 | wall | "
        "quantize | per block | per weight | written |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_block = r["quantize_seconds"] / r["blocks"]
        per_weight = r["quantize_seconds"] / r["quantized_params"] * 1e6
        lines.append(
            f"| {r['blocks']} | {commit_of(r)} | {r['quantized_params'] / 1e6:,.0f} M | "
            f"{r['fp32_bytes'] / 1e9:.2f} GB | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
            f"{r['peak_rss_bytes'] / r['fp32_bytes']:.2f} | {r['wall_seconds']:.0f} s | "
            f"{r['quantize_seconds']:.0f} s | {per_block:.0f} s | {per_weight:.2f} µs | "
            f"{r['bytes_written'] / 1e9:.3f} GB |"
        )
    if len(rows) > 1:
        flat = {r["blocks"]: r["peak_rss_bytes"] for r in rows}
        if 2 in flat and 8 in flat:
            lines += [
                "",
                f"Peak RSS, 8 blocks / 2 blocks: {flat[8] / flat[2]:.2f} (target ≤ 1.15).",
            ]
    results.write(lines, plot=lambda png: plot_synthetic(rows, png))


def plot_synthetic(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [r["blocks"] for r in rows]
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    memory.plot(blocks, [r["peak_rss_bytes"] / 1e9 for r in rows], "o-", label="peak RSS")
    memory.plot(blocks, [r["fp32_bytes"] / 1e9 / 3 for r in rows], "--", label="fp32 model / 3")
    memory.set(xlabel="decoder blocks", ylabel="GB", title="memory while quantizing")
    memory.legend()
    speed.plot(blocks, [r["quantize_seconds"] / r["quantized_params"] * 1e6 for r in rows], "o-")
    speed.set(xlabel="decoder blocks", ylabel="µs per quantized weight", title="time per weight")
    speed.set_ylim(bottom=0)
    fig.suptitle("cmpq quantize, Llama-3-8B-wide random-weight models, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def worktree(commit: str) -> Path:
    """A checkout of ``commit`` (its ``src`` runs with this environment's packages)."""
    path = Path(tempfile.gettempdir()) / f"cmpq-worktree-{commit}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                       check=True, capture_output=True)  # fmt: skip
    return path


def bench_smollm2(bits_list: list[float], before: str, codes: list[str]) -> None:
    command = (
        f"python benchmarks/scale_bench.py smollm2 --bits {' '.join(f'{b:g}' for b in bits_list)} "
        f"--before {before} --codes {' '.join(codes)}"
    )
    results = ResultsFile.open(SMOLLM2_STEM, command)
    for code in codes:
        env = None
        if code == "before":
            env = {**os.environ, "PYTHONPATH": str(worktree(before) / "src")}
        for bits in bits_list:
            with tempfile.TemporaryDirectory() as scratch:
                argv = ["smollm2-135m", "--bits", f"{bits:g}", "--out", f"{scratch}/q"]
                report, seconds, peak = run_cmpq(argv, env)
            row = ResultsFile.stamp(
                {"code": code, "bits": bits, "wall_seconds": seconds,
                 "quantize_seconds": report["seconds"], "peak_rss_bytes": peak,
                 "effective_bits": report["effective_bits"]},
                report["config"],
            )  # fmt: skip
            if code == "before":
                row["commit"] = before
            results.rows = [r for r in results.rows if (r["code"], r["bits"]) != (code, bits)] + [
                row
            ]
            write_smollm2(results)


def write_smollm2(results: ResultsFile) -> None:
    rows = sorted(results.rows, key=lambda r: (r["bits"], r["code"] != "before"))
    lines = [
        "`cmpq quantize smollm2-135m --bits B`, every default (128 x 512 calibration tokens), "
        "the model already in the cache; `before` is the code at the commit named, `after` "
        "this issue's.",
        "",
        "| bits | code | commit | wall | quantize | peak RSS | total bits |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['bits']:g} | {r['code']} | {commit_of(r)} | {r['wall_seconds']:.0f} s | "
          f"{r['quantize_seconds']:.0f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
          f"{r['effective_bits']:.3f} |" for r in rows),
    ]  # fmt: skip
    results.write(lines, plot=lambda png: plot_smollm2(rows, png))


def plot_smollm2(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for code, marker in (("before", "s--"), ("after", "o-")):
        chosen = [r for r in rows if r["code"] == code]
        bits = [r["bits"] for r in chosen]
        memory.plot(bits, [r["peak_rss_bytes"] / 1e9 for r in chosen], marker, label=code)
        speed.plot(bits, [r["wall_seconds"] for r in chosen], marker, label=code)
    memory.set(xlabel="total bits per weight", ylabel="peak RSS (GB)", ylim=(0, None))
    speed.set(xlabel="total bits per weight", ylabel="wall clock (s)", ylim=(0, None))
    memory.legend()
    fig.suptitle("cmpq quantize smollm2-135m, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["synthetic", "smollm2"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.5])
    parser.add_argument("--before", default="a9d9259")
    codes = ["before", "after"]
    parser.add_argument("--codes", nargs="+", choices=codes, default=codes)
    args = parser.parse_args()
    if args.command == "synthetic":
        bench_synthetic(args.blocks, args.samples, args.seqlen)
    else:
        bench_smollm2(args.bits, args.before, args.codes)


if __name__ == "__main__":
    main()
