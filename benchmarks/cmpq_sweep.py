"""CMPQ vs RTN on one model: perplexity against total stored bits per weight.

    python benchmarks/cmpq_sweep.py [--model smollm2-135m] [--windows 40] [--seqlen 512]

Writes benchmarks/results/cmpq-<model>.{json,md,png}, updating them after every
row so an interrupted run keeps what it measured. Calibration statistics (C4
train windows, the CMPQConfig defaults) are collected once from the
full-precision model and reused by every CMPQ row (non-sequential CMPQ uses
exactly these statistics); each row's `seconds` is its quantization time
without that shared calibration, which is reported in its own row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cmpq import CMPQConfig, RTNConfig, load_model, perplexity, quantize
from cmpq.calibrate import collect_stats
from cmpq.models import quantizable_linears
from cmpq.quantize import calibration_batch
from cmpq.report import peak_rss_bytes

RESULTS = Path(__file__).parent / "results"
DATASETS = ("wikitext2", "c4")
PLAN = [  # most telling first, so a cut-short run still answers the main questions
    ("cmpq", 3.0),
    ("rtn", 3),
    ("cmpq", 2.2),
    ("cmpq", 2.0),
    ("cmpq", 2.5),
    ("cmpq", 4.0),
    ("rtn", 4),
    ("cmpq", 3.3),
    ("cmpq", 4.5),
    ("rtn", 2),
]


def evaluate_rows(model, tokenizer, base: dict, args) -> list[dict]:
    rows = []
    for dataset in DATASETS:
        result = perplexity(model, tokenizer, dataset, args.seqlen, args.windows, progress=False)
        rows.append(
            {
                **base,
                "dataset": dataset,
                "seqlen": args.seqlen,
                "windows": args.windows,
                "ppl": result.ppl,
            }
        )
        print(
            f"{base['method']:>5} {base['bits']:.3f} bits  {dataset:<10} {result.ppl:10.2f}",
            flush=True,
        )
    return rows


def write_outputs(rows: list[dict], name: str, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    lines = [
        f"Command: `{command}`",
        "",
        "| method | setting | bits (total stored) | WikiText-2 ppl | C4 ppl "
        "| quant s | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    keyed: dict[tuple, dict] = {}
    for row in rows:
        keyed.setdefault((row["method"], row["setting"]), {**row})[row["dataset"]] = row["ppl"]
    for row in sorted(keyed.values(), key=lambda r: (r["method"], r["bits"])):
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['bits']:.3f} | "
            f"{row.get('wikitext2', float('nan')):.2f} | {row.get('c4', float('nan')):.2f} | "
            f"{row['seconds']:.0f} | {row['peak_rss_bytes'] / 1e9:.2f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / f"{name}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DATASETS), figsize=(11, 4.2))
    for axis, dataset in zip(axes, DATASETS, strict=True):
        for method, marker in [("fp", "*"), ("rtn", "s"), ("cmpq", "o")]:
            points = sorted(
                (r["bits"], r["ppl"])
                for r in rows
                if r["method"] == method and r["dataset"] == dataset
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker=marker, label=method)
        axis.set_yscale("log")
        axis.set_xlabel("total stored bits per weight (decoder linears)")
        axis.set_ylabel("perplexity")
        axis.set_title(dataset)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    command = (
        f"python benchmarks/cmpq_sweep.py --model {args.model} "
        f"--windows {args.windows} --seqlen {args.seqlen}"
    )
    name = f"cmpq-{args.model}"
    rows: list[dict] = []

    model, tokenizer = load_model(args.model)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    common = {"model": args.model, "params": params}
    rows += evaluate_rows(
        model,
        tokenizer,
        {
            **common,
            "method": "fp",
            "setting": "fp32",
            "bits": 16.0,
            "seconds": 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        args,
    )
    write_outputs(rows, name, command)
    start = time.perf_counter()
    stats = collect_stats(model, calibration_batch(tokenizer, model, CMPQConfig()), progress=True)
    calibration_seconds = time.perf_counter() - start
    print(f"calibration: {calibration_seconds:.0f} s", flush=True)

    for method, bits in PLAN:
        model, tokenizer = load_model(args.model)
        if method == "rtn":
            config = RTNConfig(bits=bits, group_size=64)
            report = quantize(model, config, progress=False)
            setting = f"{bits}-bit g64"
        else:
            config = CMPQConfig(bits=bits)
            report = quantize(model, config, stats=stats, progress=False)
            setting = f"target {bits} (code bits {report.code_bits:.3f})"
        base = {
            **common,
            "method": method,
            "setting": setting,
            "bits": report.effective_bits,
            "bits_breakdown": report.as_dict()["bits_breakdown"],
            "config": config.as_dict(),
            "seconds": report.seconds,
            "calibration_seconds": calibration_seconds if method == "cmpq" else 0.0,
            "peak_rss_bytes": report.peak_rss_bytes,
        }
        rows += evaluate_rows(model, tokenizer, base, args)
        write_outputs(rows, name, command)


if __name__ == "__main__":
    main()
