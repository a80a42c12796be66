"""cmpq commands timed as a user runs them: wall clock, peak memory, what they print.

    python benchmarks/command_bench.py demo [--model smollm2-135m]
    python benchmarks/command_bench.py quantize [--model smollm2-135m] [--bits 4.5]
    python benchmarks/command_bench.py calibration [--model smollm2-135m] [--bits 2.5]
        [--samples 16 32 64 128]

Each runs the ``cmpq`` command in a child process (the model already in the
cache: download and conversion are not timed), with torch at its default thread
count, and records its wall clock, its peak resident memory and what it
reported. ``demo`` writes benchmarks/results/demo-<model>.{json,md}: the
demo's table (full precision, RTN 3-bit g64, CMPQ at its default 2.5 bits on
WikiText-2 40 x 512). ``quantize`` writes
benchmarks/results/quantize-time-<model>-<bits>.{json,md}: the quantization
report (total bits, the break-down, the quantization seconds) of
``cmpq quantize MODEL --bits B`` with every default on. ``calibration``
writes benchmarks/results/calibration-<model>.{json,md,png}: for each number of
calibration windows (512 tokens each), ``cmpq quantize MODEL --bits B
--calib-samples N`` (time, peak RSS) and the perplexity of its output
(``cmpq eval``, WikiText-2 40 x 512, as the demo measures): what a shorter
calibration saves in time and costs in perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from results import ResultsFile, commit_of, run_child

DEMO_LABELS = ("full precision (fp32)", "RTN 3-bit g64", "CMPQ")


def run(argv: list[str]) -> tuple[str, float, int]:
    """``cmpq argv``'s standard output, wall seconds and peak resident bytes."""
    done = run_child([sys.executable, "-m", "cmpq.cli", *argv])
    if done.returncode != 0:
        raise SystemExit(f"cmpq {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return done.stdout, done.seconds, done.peak_rss_bytes


def demo_rows(stdout: str) -> list[dict]:
    """The demo's printed table as rows."""
    rows = []
    for line in stdout.splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and parts[0].startswith(DEMO_LABELS):
            try:
                bits, megabytes, ppl = map(float, parts[1:])
            except ValueError:  # a line of prose after the table
                continue
            rows.append({"model_variant": parts[0], "bits": bits, "mb": megabytes, "ppl": ppl})
    return rows


def bench_demo(model: str) -> None:
    command = f"python benchmarks/command_bench.py demo --model {model}"
    stdout, seconds, peak = run(["demo", "--model", model])
    table = demo_rows(stdout)
    row = ResultsFile.stamp(
        {"model": model, "seconds": seconds, "peak_rss_bytes": peak, "table": table},
        {"command": f"cmpq demo --model {model}"},
    )
    lines = [
        f"`cmpq demo --model {model}` with the model already in the cache: {seconds:.0f} s "
        f"wall clock, peak RSS {peak / 1e9:.2f} GB (commit {commit_of(row)}, "
        f"{row['machine']['threads']} torch threads). WikiText-2, 40 x 512 tokens; bits and "
        "sizes count everything stored for the decoder linears.",
        "",
        "| model | bits/weight | size (MB) | perplexity |",
        "|---|---|---|---|",
        *(f"| {r['model_variant']} | {r['bits']:.2f} | {r['mb']:.2f} | {r['ppl']:.2f} |"
          for r in table),
    ]  # fmt: skip
    results = ResultsFile(f"demo-{model}", command, [row])
    results.write(lines)
    print("\n".join(lines))


def bench_quantize(model: str, bits: float) -> None:
    command = f"python benchmarks/command_bench.py quantize --model {model} --bits {bits:g}"
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        argv = ["quantize", model, "--bits", f"{bits:g}", "--out", f"{scratch}/q"]
        stdout, seconds, peak = run([*argv, "--json", str(report_path)])
        report = json.loads(report_path.read_text())
    row = ResultsFile.stamp(
        {"model": model, "wall_seconds": seconds, "peak_rss_bytes": peak, "report": report},
        report["config"],
    )
    breakdown = ", ".join(f"{k} {v:.3f}" for k, v in report["bits_breakdown"].items())
    lines = [
        f"`cmpq quantize {model} --bits {bits:g}` with every default on (commit "
        f"{commit_of(row)}, {row['machine']['threads']} torch threads, load "
        f"{row['machine']['load_at_start']} at the start):",
        "",
        "| measure | value |",
        "|---|---|",
        f"| total stored bits per weight | {report['effective_bits']:.3f} ({breakdown}) |",
        f"| decoder linears stored | {report['stored_bytes'] / 1e6:.2f} MB |",
        f"| quantization, calibration included (the report's `seconds`) | "
        f"{report['seconds']:.0f} s |",
        f"| wall clock, with loading and writing | {seconds:.0f} s |",
        f"| peak RSS | {peak / 1e9:.2f} GB |",
    ]
    results = ResultsFile(f"quantize-time-{model}-{bits:g}", command, [row])
    results.write(lines)
    print("\n".join(lines))


def bench_calibration(model: str, bits: float, samples: list[int]) -> None:
    listed = " ".join(map(str, samples))
    command = (
        f"python benchmarks/command_bench.py calibration --model {model} --bits {bits:g} "
        f"--samples {listed}"
    )
    results = ResultsFile.open(f"calibration-{model}", command)
    for count in samples:
        with tempfile.TemporaryDirectory() as scratch:
            report_path, eval_path = Path(scratch) / "report.json", Path(scratch) / "eval.json"
            out = f"{scratch}/q"
            argv = ["quantize", model, "--bits", f"{bits:g}", "--calib-samples", str(count)]
            _, seconds, peak = run([*argv, "--out", out, "--json", str(report_path)])
            run(["eval", out, "--windows", "40", "--seqlen", "512", "--json", str(eval_path)])
            report = json.loads(report_path.read_text())
            evaluation = json.loads(eval_path.read_text())
        row = ResultsFile.stamp(
            {
                "model": model,
                "bits": bits,
                "calib_samples": count,
                "quantize_seconds": report["seconds"],
                "wall_seconds": seconds,
                "peak_rss_bytes": peak,
                "effective_bits": report["effective_bits"],
                "ppl": evaluation["ppl"],
            },
            report["config"],
        )
        results.rows = [
            r for r in results.rows if (r["bits"], r["calib_samples"]) != (bits, count)
        ] + [row]
        write_calibration(results, model)


def write_calibration(results: ResultsFile, model: str) -> None:
    rows = sorted(results.rows, key=lambda r: (r["bits"], r["calib_samples"]))
    lines = [
        f"`cmpq quantize {model} --bits B --calib-samples N` (512 tokens per window, every "
        "other default), then `cmpq eval` of the output on WikiText-2, 40 x 512 tokens.",
        "",
        "| bits | calibration windows | commit | quantize | peak RSS | bits/weight | perplexity |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['bits']:g} | {r['calib_samples']} | {commit_of(r)} | "
          f"{r['quantize_seconds']:.0f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
          f"{r['effective_bits']:.3f} | {r['ppl']:.2f} |" for r in rows),
    ]  # fmt: skip

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for bits in sorted({r["bits"] for r in rows}):
            chosen = [r for r in rows if r["bits"] == bits]
            ax.plot([r["quantize_seconds"] for r in chosen], [r["ppl"] for r in chosen], "o-",
                    label=f"{bits:g} bits")  # fmt: skip
            for r in chosen:
                ax.annotate(str(r["calib_samples"]), (r["quantize_seconds"], r["ppl"]))
        ax.set(xlabel="quantize seconds (2 CPU cores)", ylabel="WikiText-2 perplexity",
               title=f"{model}: calibration windows vs time and quality")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    results.write(lines, plot)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["demo", "quantize", "calibration"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--bits", type=float, help="total bits (quantize: 4.5, calibration: 2.5, the demo's)"
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    if args.command == "demo":
        bench_demo(args.model)
    elif args.command == "quantize":
        bench_quantize(args.model, 4.5 if args.bits is None else args.bits)
    else:
        bench_calibration(args.model, 2.5 if args.bits is None else args.bits, args.samples)


if __name__ == "__main__":
    main()
