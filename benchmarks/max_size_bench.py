"""How close ``--max-size`` lands to the byte budget on a real model.

    python benchmarks/max_size_bench.py --model smollm2-135m --sizes 85MB,90MB,100MB,120MB

For each budget: the bits per weight cmpq derives (``cmpq.alloc.size.bits_for_size``),
then the same quantize + save as ``cmpq quantize --max-size``, on the cached
calibration statistics of benchmarks/cmpq_bench.py; the row records the size of
the written model.safetensors and how far under the budget it is (the target:
under, by at most 0.5 %). No perplexity: this measures sizing only. Writes
benchmarks/results/max-size-<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cmpq import CMPQConfig, load_model, quantize, save_quantized
from cmpq.alloc.size import bits_for_size, parse_size
from cmpq.config import PAPER_METHOD
from cmpq.format.spec import WEIGHTS_FILE

from cmpq_bench import calibration_stats
from results import ResultsFile, commit_of

TARGET_SLACK = 0.005  # the target: within 0.5 % under the budget


def measure(model_name: str, size_text: str) -> dict:
    max_bytes = parse_size(size_text)
    model, tokenizer = load_model(model_name)
    stats, _ = calibration_stats(model, tokenizer, model_name)
    bits = bits_for_size(model, max_bytes)
    # the paper method, as the committed rows were measured (sizing is the same arithmetic
    # for every allocation: tests/test_sizing.py)
    config = CMPQConfig(bits=bits, **PAPER_METHOD)
    report = quantize(model, config, progress=False, stats=stats)
    with tempfile.TemporaryDirectory() as scratch:
        out = save_quantized(model, tokenizer, report, Path(scratch) / "q")
        size = (out / WEIGHTS_FILE).stat().st_size
    row = {
        "model": model_name,
        "max_size": size_text,
        "max_bytes": max_bytes,
        "requested_bits": bits,
        "effective_bits": report.effective_bits,
        "model_bytes": size,
        "under_fraction": (max_bytes - size) / max_bytes,
    }
    return ResultsFile.stamp(row, config.as_dict())


def write_outputs(model_name: str, rows: list[dict], command: str) -> None:
    lines = [
        "| --max-size | bytes allowed | model.safetensors bytes | under by | "
        "bits/weight asked | bits/weight stored | within 0.5 % under | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = 0 <= row["under_fraction"] <= TARGET_SLACK
        lines.append(
            f"| {row['max_size']} | {row['max_bytes']:,} | {row['model_bytes']:,} | "
            f"{row['under_fraction']:.3%} | {row['requested_bits']:.3f} | "
            f"{row['effective_bits']:.3f} | {'yes' if ok else 'no'} | {commit_of(row)} |"
        )
    ResultsFile(f"max-size-{model_name}", command, rows).write(
        lines, lambda path: plot(model_name, rows, path)
    )


def plot(model_name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    allowed = [row["max_bytes"] / 1e6 for row in rows]
    axis.plot(allowed, [100 * row["under_fraction"] for row in rows], marker="o")
    axis.axhspan(0, 100 * TARGET_SLACK, color="green", alpha=0.15, label="target: 0-0.5 % under")
    axis.set_xlabel("--max-size (MB)")
    axis.set_ylabel("model.safetensors under the budget (%)")
    axis.set_title(model_name)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", default="85MB,90MB,100MB,120MB")
    args = parser.parse_args()
    command = f"python benchmarks/max_size_bench.py --model {args.model} --sizes {args.sizes}"
    rows = []
    for size_text in args.sizes.split(","):
        rows.append(measure(args.model, size_text))
        row = rows[-1]
        print(
            f"{size_text}: {row['model_bytes']:,} bytes, {row['under_fraction']:.3%} under, "
            f"{row['effective_bits']:.3f} bits/weight",
            flush=True,
        )
        write_outputs(args.model, rows, command)


if __name__ == "__main__":
    main()
