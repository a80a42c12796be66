"""How the k-means seeds and the boundary search trade table error for time, on real weights.

    python benchmarks/kmeans_bench.py --model smollm2-135m

For three linears of one decoder block (the column layout's problems: one table per input
column over its ``out`` weights, unweighted), fits ``2**bits`` entries at each width with
``cmpq.kmeans.weighted_kmeans_1d`` from each deterministic seed (``quantile``, ``companded``),
with plain Lloyd and with the boundary search (``refine``), 25 iterations. Each row gives the
summed squared error relative to the lowest any variant reached for that layer and width,
and the seconds at 1 thread. Writes benchmarks/results/kmeans-<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cmpq import load_model
from cmpq.models.graph import decoder_blocks
from cmpq.quant.kmeans import weighted_kmeans_1d, weighted_sse

from results import ResultsFile

LINEARS = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
WIDTHS = (2, 3, 4, 5, 6, 8)
VARIANTS = {
    "quantile + Lloyd": {"init": "quantile", "refine": False},
    "quantile + search": {"init": "quantile", "refine": True},
    "companded + Lloyd": {"init": "companded", "refine": False},
    "companded + search": {"init": "companded", "refine": True},
}


def measure(model_name: str, block_index: int, columns: int) -> list[dict]:
    torch.set_num_threads(1)
    model, _ = load_model(model_name)
    _, blocks = decoder_blocks(model)
    modules = dict(blocks[block_index].named_modules())
    rows = []
    for name in LINEARS:
        values = modules[name].weight.detach().float().t()[:columns].contiguous()
        for bits in WIDTHS:
            found = {}
            for variant, options in VARIANTS.items():
                start = time.perf_counter()
                centroids, codes = weighted_kmeans_1d(values, None, 2**bits, iters=25, **options)
                seconds = time.perf_counter() - start
                error = float(weighted_sse(values, None, centroids, codes).sum())
                found[variant] = (error, seconds)
            best = min(error for error, _ in found.values())
            for variant, (error, seconds) in found.items():
                rows.append(
                    ResultsFile.stamp(
                        {
                            "linear": f"block {block_index} {name}",
                            "shape": list(values.shape),
                            "bits": bits,
                            "variant": variant,
                            "sse": error,
                            "relative_sse": error / best,
                            "seconds": seconds,
                        },
                        {"iters": 25, "block": block_index, "columns": columns, **options},
                    )
                )
    return rows


def write_outputs(model_name: str, rows: list[dict], command: str) -> None:
    results = ResultsFile(f"kmeans-{model_name}", command, rows)
    lines = [
        "Squared error of each column's table relative to the best variant (1.000 = best), "
        "and seconds at 1 thread.",
        "",
        "| linear | bits | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    keyed = {(r["linear"], r["bits"], r["variant"]): r for r in rows}
    for linear in dict.fromkeys(r["linear"] for r in rows):
        for bits in WIDTHS:
            found = [keyed[linear, bits, v] for v in VARIANTS]
            cells = [f"{r['relative_sse']:.3f} ({r['seconds']:.2f} s)" for r in found]
            lines.append(f"| {linear} | {bits} | " + " | ".join(cells) + " |")
    results.write(lines, lambda path: plot(model_name, rows, path))


def plot(model_name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        error = [
            torch.tensor([r["relative_sse"] for r in mine if r["bits"] == b]).log().mean().exp()
            for b in WIDTHS
        ]
        seconds = [sum(r["seconds"] for r in mine if r["bits"] == b) for b in WIDTHS]
        axes[0].plot(WIDTHS, error, marker="o", label=variant)
        axes[1].plot(WIDTHS, seconds, marker="o", label=variant)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("table error / best (geometric mean over linears)")
    axes[1].set_ylabel("seconds (sum over linears, 1 thread)")
    for axis in axes:
        axis.set_xlabel("bits per entry")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(f"{model_name}: column tables, 25 iterations")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--columns", type=int, default=256, help="input columns per linear")
    args = parser.parse_args()
    command = (
        f"python benchmarks/kmeans_bench.py --model {args.model} --block {args.block} "
        f"--columns {args.columns}"
    )
    rows = measure(args.model, args.block, args.columns)
    write_outputs(args.model, rows, command)
    print(f"wrote benchmarks/results/kmeans-{args.model}.md")


if __name__ == "__main__":
    main()
