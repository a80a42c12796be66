"""cmpq side by side with GPTQ, HQQ, torchao, bitsandbytes and llama.cpp.

    make bench-peers                      # both models, in the .venv-bench environment
    python benchmarks/peers/run_peers.py --model smollm2-135m [--only gptq,hqq] [--redo]

Every peer quantizes the same full-precision model through its own pip package
(see peers.py) on the CPU, with cmpq's C4 calibration windows where it
calibrates; every result is evaluated by cmpq's own evaluator on WikiText-2 and
C4 validation, 40 x 512 by default. Each setting runs in its own process, so
its quantization time and peak memory are its own and a crashing peer costs one
row (recorded with its error), not the run. Results go to
benchmarks/results/peers-<model>.{json,md,png}, rewritten after every setting;
settings already in the JSON are skipped unless --redo, so an interrupted run
resumes. --import-rows takes fp / rtn / cmpq rows measured by
benchmarks/cmpq_bench.py with the same evaluator, windows and context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared results writer and cmpq_bench's statistics

from results import UNTUNED, ResultsFile, commit_of, replaced  # noqa: E402

DATASETS = ("wikitext2", "c4")
PLOT_CEILING = 3000.0  # perplexities above this are off the plot (they are in the table)


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # unique name, the row's "setting"
    method: str  # fp, cmpq, rtn, or a peer adapter name
    series: str  # plot line
    options: dict


# cmpq's defaults again at the total bits llama.cpp's mixes measured on each model
# (IQ3_XXS, Q2_K, Q3_K_M) and, on gemma3-270m, re-tuned GPTQ 4-bit g64 (4.349), so
# the closest peers are compared at equal bits
MATCHED_BITS = {"smollm2-135m": (4.14, 4.23, 4.63), "gemma3-270m": (4.07, 4.15, 4.349, 4.54)}


def plan(model: str = "") -> list[Setting]:
    from cmpq.config import PAPER_METHOD

    settings = [Setting("fp32", "fp", "fp32", {})]
    settings += [
        Setting(f"hqq {bits}-bit g64", "hqq", "HQQ g64", {"bits": bits, "group": 64})
        for bits in (2, 3, 4)
    ]
    settings += [
        Setting(f"torchao int{bits} g{group}", "torchao", f"torchao g{group}",
                {"bits": bits, "group": group})
        for group in (32, 64)
        for bits in (2, 3, 4)
    ]  # fmt: skip
    settings += [
        Setting("bnb nf4 b64", "bitsandbytes", "bnb NF4", {"block": 64, "double_quant": False}),
        Setting(
            "bnb nf4 b64 double-quant", "bitsandbytes", "bnb NF4",
            {"block": 64, "double_quant": True},
        ),
    ]  # fmt: skip
    # llama.cpp's own mixes (the types it picks per tensor are in the bits). No --pure
    # variants: only the decoder linears are taken from the GGUF, so how a mix would
    # quantize the embeddings never enters the comparison.
    settings += [
        Setting(f"llama.cpp {kind}", "llama.cpp", "llama.cpp", {"type": kind, "pure": False})
        for kind in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ2_XS", "IQ3_XXS")
    ]
    settings += [
        Setting(f"gptq {bits}-bit g{group}", "gptq", f"GPTQ g{group}",
                {"bits": bits, "group": group})
        for group in (128, 64)
        for bits in (3, 2, 4)
    ]  # fmt: skip
    settings += [  # the same settings re-tuned (issue 18): the table shows each one's best
        Setting(f"gptq {bits}-bit g{group} {variant_name(desc, sym, damp)}", "gptq",
                f"GPTQ g{group}",
                {"bits": bits, "group": group, "desc_act": desc, "sym": sym, "damp_percent": damp})
        for bits in (4, 3, 2)
        for group in (64, 128)
        for desc, sym, damp in GPTQ_VARIANTS
    ]  # fmt: skip
    settings += [  # AWQ (llm-compressor), asymmetric, on cmpq's calibration windows
        Setting(f"awq {bits}-bit g{group}", "awq", f"AWQ g{group}",
                {"bits": bits, "group": group})
        for bits in (4, 3, 2)
        for group in (64, 128)
    ]  # fmt: skip
    settings += [  # SqueezeLLM's recipe from cmpq's parts (cmpq.config.SQUEEZELLM_METHOD)
        Setting(
            f"squeezellm-style {width}-bit",
            "cmpq",
            "SqueezeLLM-style (cmpq parts)",
            {"squeezellm_width": width},
        )
        for width in (2, 3, 4)
    ]
    settings += [
        Setting(f"rtn {bits}-bit g64", "rtn", "cmpq RTN g64", {"bits": bits, "group": 64})
        for bits in (2, 3, 4)
    ]
    settings += [  # the paper's method (cmpq's defaults until issue 5)
        Setting(f"cmpq {bits}", "cmpq", "cmpq (paper method)", {"bits": bits, **PAPER_METHOD})
        for bits in (2.0, 2.2, 2.5, 3.0, 3.3, 4.0, 4.5)
    ]
    settings += [  # cmpq's defaults: rd-layer allocation with error feedback
        Setting(f"cmpq rd-layer+ef {bits}", "cmpq", "cmpq (default: rd-layer + feedback)",
                {"bits": bits, "allocation": "rd-layer", "error_feedback": True})
        for bits in (4.5, 4.0, 3.3, 2.0, 3.0, 2.5, 2.2, *MATCHED_BITS.get(model, ()))
    ]  # fmt: skip
    settings += [  # ... without the model tuning they do at 3.5 bits or fewer (issue 18)
        Setting(f"cmpq rd-layer+ef {bits}{UNTUNED}", "cmpq", "cmpq (default, no model tuning)",
                {"bits": bits, "allocation": "rd-layer", "error_feedback": True,
                 "tune_model": 0})
        for bits in (2.0, 2.5, 2.2, 3.0, 3.3)
    ]  # fmt: skip
    return settings


# act order on and off, symmetric and asymmetric, damping 0.01 and 0.05
GPTQ_VARIANTS = [(d, s, p) for d in (True, False) for s in (True, False) for p in (0.01, 0.05)]


def variant_name(desc_act: bool, sym: bool, damp: float) -> str:
    return f"{'act-order' if desc_act else 'no-act-order'} {'sym' if sym else 'asym'} damp {damp}"


def family_of(row: dict) -> str:
    """The setting a re-tuned variant belongs to (the variants of one show as its best)."""
    options = row.get("settings") or {}
    if row.get("method") == "gptq" and "desc_act" in options:
        return f"gptq {options['bits']}-bit g{options['group']} re-tuned"
    return row["setting"]


def series_of(model: str, key: str) -> str:
    return next((s.series for s in plan(model) if s.key == key), key)


# --- one setting, in a child process -----------------------------------------------


def run_one(model_spec: str, setting: Setting, args) -> list[dict]:
    import torch

    from cmpq import CMPQConfig, RTNConfig, load_model, perplexity, quantize
    from cmpq.memory import peak_rss_bytes
    from cmpq.models.graph import quantizable_linears
    from cmpq.models.sources import cache_dir
    from cmpq.quant.pipeline import calibration_batch

    torch.manual_seed(0)
    model, tokenizer = load_model(model_spec)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    row = {"model": model_spec, "params": params, "method": setting.method,
           "setting": setting.key, "settings": setting.options,
           "threads": torch.get_num_threads()}  # fmt: skip
    start = time.perf_counter()
    if setting.method == "fp":
        row.update(bits=16.0, peer_version="", bits_source="reference line (fp16 storage)")
    elif setting.method in ("cmpq", "rtn"):
        from importlib.metadata import version

        from cmpq_bench import calibration_stats  # the cached statistics the sweep uses

        if setting.method == "rtn":
            config, stats = RTNConfig(setting.options["bits"], setting.options["group"]), None
        else:
            options = dict(setting.options)
            if "squeezellm_width" in options:
                options = squeezellm_options(model, options.pop("squeezellm_width"))
            config = CMPQConfig(**options)
            stats, row["calibration_seconds"] = calibration_stats(
                model, tokenizer, model_spec, gram=config.error_feedback
            )
            start = time.perf_counter()
        report = quantize(model, config, tokenizer=tokenizer, progress=False, stats=stats)
        row.update(bits=report.effective_bits, peer_version=f"cmpq {version('cmpq')}",
                   bits_source="stored tensors (cmpq's report)",
                   bits_breakdown=report.as_dict()["bits_breakdown"],
                   config=report.config, tuning=report.tuning)  # fmt: skip
    else:
        from peers import ADAPTERS, PeerContext

        workdir = cache_dir() / "peers" / model_spec / setting.key.replace(" ", "_")
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        calibration = calibration_batch(tokenizer, model, CMPQConfig())
        context = PeerContext(model_spec, calibration, tokenizer, workdir)
        start = time.perf_counter()
        result = ADAPTERS[setting.method](model, setting.options, context)
        row.update(bits=result.stored_bits / params, peer_version=result.peer_version,
                   bits_source=result.bits_source,
                   calibration_seconds=result.calibration_seconds)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)
    row.update(seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())
    row = ResultsFile.stamp(row)
    rows = []
    for dataset in DATASETS:
        result = perplexity(model, tokenizer, dataset, args.seqlen, args.windows, progress=False)
        rows.append({**row, "dataset": dataset, "seqlen": args.seqlen,
                     "windows": args.windows, "ppl": result.ppl})  # fmt: skip
        print(f"{setting.key}: {row['bits']:.3f} bits, {dataset} {result.ppl:.2f}", flush=True)
    return rows


def squeezellm_options(model, width: int) -> dict:
    """CMPQConfig options for SqueezeLLM's recipe at ``width``-bit codes: the total bits
    of ``width``-bit codes, one fp16 table per output row and 0.45 % outliers."""
    from cmpq.alloc.budget import model_cost
    from cmpq.config import SQUEEZELLM_METHOD, SQUEEZELLM_OUTLIERS
    from cmpq.format.cost import LayerShape
    from cmpq.models.graph import quantizable_linears, weight_matrix

    linears = quantizable_linears(model).values()
    shapes = [LayerShape(*weight_matrix(m).shape) for m in linears]
    params = sum(shape.numel for shape in shapes)
    cost = model_cost(shapes, width, "row", SQUEEZELLM_OUTLIERS, False)
    return {"bits": math.ceil(cost / params * 1e4) / 1e4, **SQUEEZELLM_METHOD}


# --- the whole plan, in the parent ----------------------------------------------------


def results_file(model: str, command: str = "") -> ResultsFile:
    return ResultsFile(f"peers-{model}", command)


def load_rows(model: str) -> list[dict]:
    return results_file(model).saved_rows()


def imported(path: Path, model: str, args) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    keep = [
        {**row, "imported_from": str(path.resolve().relative_to(HERE.parent.parent))}
        for row in rows
        if row["model"] == model and row["method"] in ("fp", "rtn", "cmpq")
        and row["windows"] == args.windows and row["seqlen"] == args.seqlen
        and row["setting"] in {s.key for s in plan(model)}
    ]  # fmt: skip
    for row in keep:
        fp = row["method"] == "fp"
        row.setdefault("peer_version", "" if fp else "cmpq (imported row)")
        row.setdefault(
            "bits_source",
            "reference line (fp16 storage)" if fp else "stored tensors (cmpq's report)",
        )
    return keep


def run_setting(model: str, setting: Setting, args) -> list[dict]:
    from cmpq.models.sources import cache_dir

    logs = cache_dir() / "peers" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{model}-{setting.key.replace(' ', '_')}.log"
    out = log.with_suffix(f".{os.getpid()}.json")  # two runs of one setting never share it
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--model", model, "--one", setting.key,
               "--row-out", str(out), "--windows", str(args.windows),
               "--seqlen", str(args.seqlen)]  # fmt: skip
    env = {**os.environ, "DISABLE_CUDA": "1", "TQDM_DISABLE": "1"}
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode == 0 and out.is_file():
        return json.loads(out.read_text())
    tail = [line for line in log.read_text().splitlines() if line.strip()][-3:]
    return [{"model": model, "method": setting.method, "setting": setting.key,
             "settings": setting.options, "dataset": None,
             "error": f"exit {done.returncode}: " + " | ".join(tail)[-600:]}]  # fmt: skip


def write_outputs(model: str, rows: list[dict], command: str) -> None:
    keyed: dict[str, dict] = {}
    for row in rows:
        entry = keyed.setdefault(row["setting"], dict(row))
        if row.get("dataset"):
            entry[row["dataset"]] = row["ppl"]
    best: dict[str, dict] = {}  # a re-tuned setting's variants show as their best
    tried: dict[str, int] = {}
    for row in (r for r in keyed.values() if "error" not in r):
        family = family_of(row)
        tried[family] = tried.get(family, 0) + 1
        if family not in best or row.get("wikitext2", math.inf) < best[family].get(
            "wikitext2", math.inf
        ):
            best[family] = row
    for family, row in best.items():  # say which variant won, and of how many measured
        if family != row["setting"]:
            options = row["settings"]
            variant = variant_name(options["desc_act"], options["sym"], options["damp_percent"])
            best[family] = {
                **row,
                "setting": f"{family} (best of {tried[family]} of {len(GPTQ_VARIANTS)}: {variant})",
            }
    measured = sorted(best.values(), key=lambda r: r["bits"])
    failed = [r for r in keyed.values() if "error" in r]
    lines = [
        f"Model `{model}`; perplexity by cmpq's evaluator on WikiText-2 (raw test) and C4 "
        f"(validation), {rows[0].get('windows', 40) if rows else 40} x "
        f"{rows[0].get('seqlen', 512) if rows else 512} tokens; bits = total stored bits per "
        "weight of the decoder linears (embeddings and lm_head full precision for all).",
        "",
        "| method | setting | bits (total stored) | WikiText-2 ppl | C4 ppl | quant s "
        "| calib s | peak RSS GB | version | bits from | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['bits']:.3f} | "
            f"{r.get('wikitext2', float('nan')):.2f} | {r.get('c4', float('nan')):.2f} | "
            f"{r.get('seconds', 0):.0f} | {r.get('calibration_seconds', 0) or 0:.0f} | "
            f"{r.get('peak_rss_bytes', 0) / 1e9:.2f} | {r.get('peer_version', '')} | "
            f"{r.get('bits_source', '')}{' (imported)' if r.get('imported_from') else ''} | "
            f"{commit_of(r)} |"
        )
    lines += budget_tables(measured)
    if failed:
        lines += ["", "Settings that did not run:", ""]
        lines += [f"- {r['setting']}: `{r['error']}`" for r in failed]
    results = results_file(model, command)
    results.rows = rows
    results.write(lines, lambda path: plot(model, measured, path))


BUDGETS = (2.25, 2.5, 3.0, 3.5, 4.0, 4.25, 4.5, 5.0)


def budget_tables(rows: list[dict]) -> list[str]:
    """Per dataset: for each bits budget, each method's best perplexity at or under it."""
    methods = sorted({r["method"] for r in rows if r["method"] != "fp"})
    lines = []
    for dataset, title in (("wikitext2", "WikiText-2"), ("c4", "C4")):
        lines += [
            "",
            f"Best {title} perplexity of each method within a budget of total bits "
            "(the setting's bits in brackets; - when none fits):",
            "",
            "| budget | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for budget in BUDGETS:
            cells = []
            for method in methods:
                fits = [
                    r for r in rows
                    if r["method"] == method and r["bits"] <= budget + 1e-9 and dataset in r
                ]  # fmt: skip
                best = min(fits, key=lambda r: r[dataset], default=None)
                cells.append(f"{best[dataset]:.2f} ({best['bits']:.2f})" if best else "-")
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines


def plot(model: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DATASETS), figsize=(13, 5.2))
    markers = "osD^v<>phX*"
    for axis, dataset in zip(axes, DATASETS, strict=True):
        series: dict[str, list] = {}
        for row in rows:
            if dataset not in row:
                continue
            if row["method"] == "fp":
                axis.axhline(row[dataset], color="gray", linestyle="--", label="full precision")
            elif row[dataset] <= PLOT_CEILING:
                series.setdefault(series_of(model, row["setting"]), []).append(
                    (row["bits"], row[dataset])
                )
        for index, (name, points) in enumerate(sorted(series.items())):
            style = {"linewidth": 2.5, "color": "black"} if name.startswith("cmpq (default") else {}
            axis.plot(*zip(*sorted(points), strict=True), marker=markers[index % len(markers)],
                      label=name, **style)  # fmt: skip
        axis.set_yscale("log")
        axis.set_xlabel("total stored bits per weight (decoder linears)")
        axis.set_ylabel("perplexity")
        axis.set_title(f"{model}, {dataset} (points above {PLOT_CEILING:.0f} not drawn)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--only", default="", help="comma-separated methods or setting names")
    parser.add_argument("--redo", action="store_true", help="re-run settings already measured")
    parser.add_argument(
        "--import-rows", type=Path, help="a cmpq_bench.py JSON with the same protocol"
    )
    parser.add_argument("--replot", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        setting = next(s for s in plan(args.model) if s.key == args.one)
        args.row_out.write_text(json.dumps(run_one(args.model, setting, args)))
        return
    command = (f"python benchmarks/peers/run_peers.py --model {args.model} "
               f"--windows {args.windows} --seqlen {args.seqlen}")  # fmt: skip
    rows = load_rows(args.model)
    if args.replot:
        write_outputs(args.model, rows, command)
        return
    if args.import_rows:
        have = {row["setting"] for row in rows}
        rows += [
            r for r in imported(args.import_rows, args.model, args) if r["setting"] not in have
        ]
        write_outputs(args.model, rows, command)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    for setting in plan(args.model):
        if wanted and setting.method not in wanted and setting.key not in wanted:
            continue
        done = {row["setting"] for row in rows if "error" not in row}
        if setting.key in done and not args.redo:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {setting.key} ...", flush=True)
        new = run_setting(args.model, setting, args)
        # re-read: another run of this script may have written rows meanwhile
        rows = replaced(load_rows(args.model), setting.key, new)
        write_outputs(args.model, rows, command)
        for row in new:
            if "error" in row:
                print(f"    failed: {row['error']}", flush=True)
            else:
                print(f"    {row['bits']:.3f} bits  {row['dataset']}: {row['ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
