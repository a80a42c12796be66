"""The README's tables of results, generated from the committed JSON.

    python benchmarks/readme_tables.py          # rewrite the generated blocks of README.md
    python benchmarks/readme_tables.py --check  # exit 1 if README.md is not up to date

Each block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``
in README.md and is written from ``benchmarks/results/*.json`` only, with the
commit each row was measured at, so a README number can be traced to its row.
tests/test_readme.py checks that the README holds what this script writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from results import RESULTS, ROOT, UNTUNED, commit_of

README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- generated: ([\w.-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
DEFAULT = "cmpq rd-layer+ef "  # the setting names of cmpq's default rows in the peers plan
PAPER = "cmpq "  # ... and of the paper method's
PEERS = ("awq", "gptq", "hqq", "torchao", "bitsandbytes", "llama.cpp")
PEER_NAMES = {
    "awq": "AWQ",
    "gptq": "GPTQ",
    "hqq": "HQQ",
    "torchao": "torchao",
    "bitsandbytes": "bnb",
}
SQUEEZELLM = "squeezellm-style "  # SqueezeLLM's recipe from cmpq's parts: a baseline, a peer


def is_peer(entry: dict) -> bool:
    return entry["method"] in PEERS or entry["setting"].startswith(SQUEEZELLM)


def load(stem: str) -> list[dict]:
    return json.loads((RESULTS / f"{stem}.json").read_text())["rows"]


def by_setting(rows: list[dict]) -> dict[str, dict]:
    """One entry per setting, with its WikiText-2 and C4 perplexities."""
    settings: dict[str, dict] = {}
    for row in rows:
        if row.get("dataset") and "error" not in row:
            entry = settings.setdefault(row["setting"], dict(row))
            entry[row["dataset"]] = row["ppl"]
    return settings


def ppl(value: float) -> str:
    return f"{value:,.0f}" if value >= 1_000 else f"{value:.2f}"


def pair(entry: dict) -> str:
    return f"{ppl(entry['wikitext2'])} / {ppl(entry['c4'])}"


def peer_label(entry: dict) -> str:
    name = entry["setting"]
    for method, label in PEER_NAMES.items():
        if entry["method"] == method:
            name = label + name[len(method) :] if name.startswith(method) else name
    return name.replace("bnb nf4", "bnb NF4").replace("squeezellm", "SqueezeLLM")


def comparison(model: str) -> list[str]:
    """cmpq's defaults at each budget, the paper's method at the same bits, and the best
    peer at or under those bits (by WikiText-2), with the commits of the cmpq rows."""
    settings = by_setting(load(f"peers-{model}"))
    fp = settings["fp32"]
    defaults = sorted(
        (e for k, e in settings.items() if k.startswith(DEFAULT) and not k.endswith(UNTUNED)),
        key=lambda e: e["bits"],
    )
    peers = [e for e in settings.values() if is_peer(e)]
    lines = [
        f"`{model}`, WikiText-2 / C4 perplexity, 40 × 512 tokens (full precision "
        f"{pair(fp)}); bits are total stored bits per weight of the decoder linears.",
        "",
        "| bits (total) | cmpq (default) | cmpq (paper method) | best peer at those bits or fewer "
        "| cmpq rows' commit |",
        "|---|---|---|---|---|",
    ]
    for entry in defaults:
        nominal = entry["setting"][len(DEFAULT) :]
        paper = settings.get(PAPER + nominal)
        # peers at the budget as printed (cmpq lands just under it; a peer matched to it
        # may sit a few thousandths above): a margin that favours the peers
        fits = [p for p in peers if p["bits"] < float(nominal) + 0.005]
        best = min(fits, key=lambda p: p["wikitext2"], default=None)
        peer = f"{peer_label(best)} ({best['bits']:.2f}): {pair(best)}" if best else "none"
        commits = [commit_of(entry)] + ([commit_of(paper)] if paper else [])
        lines.append(
            f"| {nominal} | **{pair(entry)}** | {pair(paper) if paper else '—'} | {peer} | "
            f"{' / '.join(dict.fromkeys(commits))} |"
        )
    lines += ["", *unbeaten(defaults, peers)]
    return lines


def unbeaten(defaults: list[dict], peers: list[dict]) -> list[str]:
    """Peer points no cmpq default point beats with the same or fewer bits, per text."""
    top = max(entry["bits"] for entry in defaults)
    missed = [
        f"{peer_label(p)} ({p['bits']:.2f} bits) on {text}"
        for p in sorted(peers, key=lambda p: p["bits"])
        if p["bits"] <= top
        for text in ("wikitext2", "c4")
        if not any(d["bits"] <= p["bits"] + 1e-9 and d[text] < p[text] for d in defaults)
    ]
    if not missed:
        return [
            f"Every peer point at or under {top:.2f} bits is beaten, on both texts, by a cmpq "
            "default point with the same or fewer bits."
        ]
    return ["Peer points no cmpq default point with the same or fewer bits beats: "
            + "; ".join(missed) + "."]  # fmt: skip


def headline(model: str = "smollm2-135m", nominal: str = "3.0") -> list[str]:
    """One current result for the first screen."""
    settings = by_setting(load(f"peers-{model}"))
    cmpq, rtn = (settings[k] for k in (DEFAULT + nominal, "rtn 3-bit g64"))
    # GPTQ at its defaults or re-tuned (act order, symmetry, damping), whichever measured best
    variants = [e for k, e in settings.items() if f"{k} ".startswith("gptq 3-bit g64 ")]
    gptq = min(variants, key=lambda e: e["wikitext2"])
    return [
        f"`{model}` at {cmpq['bits']:.2f} total stored bits per weight (everything counted), "
        f"WikiText-2 perplexity **{ppl(cmpq['wikitext2'])}** (40 × 512 tokens; full precision "
        f"{ppl(settings['fp32']['wikitext2'])}; GPTQ 3-bit g64, the best variant measured, at "
        f"{gptq['bits']:.2f} bits {ppl(gptq['wikitext2'])}; round-to-nearest 3-bit g64 at "
        f"{rtn['bits']:.2f} bits "
        f"{ppl(rtn['wikitext2'])}). cmpq row measured at commit {commit_of(cmpq)}.",
    ]


def demo(model: str = "smollm2-135m") -> list[str]:
    (row,) = load(f"demo-{model}")
    lines = [
        "| model | bits/weight | size (MB) | perplexity |",
        "|---|---|---|---|",
        *(f"| {r['model_variant']} | {r['bits']:.2f} | {r['mb']:.2f} | {r['ppl']:.2f} |"
          for r in row["table"]),
        "",
        f"It took {row['seconds'] / 60:.1f} minutes with the model already in the cache "
        f"({row['machine']['threads']} torch threads, {row['machine']['cpu']}, commit "
        f"{commit_of(row)}; `python benchmarks/command_bench.py demo`).",
    ]  # fmt: skip
    return lines


def quantize_time(stem: str = "quantize-time-smollm2-135m-4.5") -> list[str]:
    (row,) = load(stem)
    report = row["report"]
    breakdown = ", ".join(f"{k} {v:.3f}" for k, v in report["bits_breakdown"].items())
    return [
        "```",
        f"cmpq: {report['layers']} linears, {report['quantized_params']:,} weights, "
        f"{report['effective_bits']:.3f} bits/weight ({breakdown}), "
        f"{report['stored_bytes'] / 1e6:.2f} MB, {report['seconds']:.1f} s",
        "```",
        "",
        f"(`cmpq quantize {row['model']} --bits {report['config']['bits']:g}` at commit "
        f"{commit_of(row)}: {report['seconds']:.0f} s of quantization, calibration included, "
        f"{row['wall_seconds']:.0f} s wall clock with loading and writing, peak RSS "
        f"{row['peak_rss_bytes'] / 1e9:.2f} GB, {row['machine']['threads']} torch threads; "
        "`python benchmarks/command_bench.py quantize`.)",
    ]


def runtime(shape: str = "4096x4096", weights: str = "cmpq 2.5") -> list[str]:
    """What a loaded model holds and how fast it runs, per model, and one 7B-shaped layer."""
    rows = load("runtime-models")
    lines = [
        "| model | variant | backend | file MB | resident MB | × file | decode tok/s | "
        "prefill tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        file_bytes = row.get("file_bytes", 0)
        after = row.get("resident_after_generate")
        file_mb = f"{file_bytes / 1e6:.1f}" if file_bytes else "—"
        resident = "—" if after is None else f"{after / 1e6:.0f}"
        ratio = f"{after / file_bytes:.2f}" if after and file_bytes else "—"
        lines.append(
            f"| {row['model']} | {row['variant']} | {row.get('backend', 'torch')} | "
            f"{file_mb} | {resident} | {ratio} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['prefill_tokens_per_s']:.0f} |"
        )
    layers = load("runtime-layers")
    decode = {
        (r["weights"], r["backend"]): r for r in layers if r["shape"] == shape and r["tokens"] == 1
    }
    kernel = decode.get((weights, "cpu"))
    if kernel is not None:
        dense = {dtype: decode[(dtype, "torch F.linear")]["ms"] for dtype in
                 ("float32", "bfloat16", "float16")}  # fmt: skip
        lines += [
            "",
            f"One {shape} linear at {weights.split()[1]} bits, one token, weights read from "
            f"memory: {kernel['ms']:.3f} ms on the cpu backend against {dense['float32']:.3f} ms "
            f"for fp32, {dense['bfloat16']:.3f} ms for bf16 and {dense['float16']:.3f} ms for "
            f"fp16 weights ({kernel['gb_per_s']:.1f} GB/s of stored weights; copy bandwidth "
            f"{kernel['copy_gb_per_s']:.1f} GB/s read + write).",
        ]
    commits = sorted({commit_of(r) for r in rows + layers})
    lines += [
        "",
        f"Measured at commit {', '.join(commits)} ({rows[0]['machine']['threads']} torch "
        f"threads, {rows[0]['machine']['cpu']}; `python benchmarks/runtime_bench.py models` "
        "and `layers`, tables in `benchmarks/results/runtime-*.md`).",
    ]
    return lines


def scale() -> list[str]:
    """Memory and time of quantizing: 8B-wide synthetic models, and smollm2 before/after."""
    lines = [
        "| model | blocks | fp32 model | peak RSS | quantize | per weight | written | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(load("scale-synthetic"), key=lambda r: r["blocks"]):
        lines.append(
            f"| Llama-3-8B-wide, random | {r['blocks']} | {r['fp32_bytes'] / 1e9:.1f} GB | "
            f"{r['peak_rss_bytes'] / 1e9:.1f} GB | {r['quantize_seconds'] / 60:.0f} min | "
            f"{r['quantize_seconds'] / r['quantized_params'] * 1e6:.2f} µs | "
            f"{r['bytes_written'] / 1e9:.2f} GB | {commit_of(r)} |"
        )
    smollm2 = sorted(load("scale-smollm2-135m"), key=lambda r: (r["bits"], r["code"]))
    for r in smollm2:
        if r["code"] != "after":
            continue
        lines.append(
            f"| smollm2-135m, {r['bits']:g} bits | 30 | 0.5 GB | "
            f"{r['peak_rss_bytes'] / 1e9:.1f} GB | {r['quantize_seconds'] / 60:.1f} min | "
            f"{r['quantize_seconds'] / 106_168_320 * 1e6:.2f} µs | — | {commit_of(r)} |"
        )
    for r in smollm2:
        if r["code"] == "before":
            lines += [
                "",
                f"Before (commit {commit_of(r)}: the whole model in fp32 and every linear's XᵀX "
                f"in memory), `smollm2-135m` at {r['bits']:g} bits peaked at "
                f"{r['peak_rss_bytes'] / 1e9:.2f} GB and took {r['wall_seconds'] / 60:.1f} min.",
            ]
    return lines


BLOCKS = {
    "scale": scale,
    "runtime": runtime,
    "headline": headline,
    "demo": demo,
    "quantize-time": quantize_time,
    "peers-smollm2-135m": lambda: comparison("smollm2-135m"),
    "peers-gemma3-270m": lambda: comparison("gemma3-270m"),
    "levers-smollm2-135m": lambda: levers("smollm2-135m"),
    "levers-gemma3-270m": lambda: levers("gemma3-270m"),
    "rd-fisher": lambda: rd_fisher(("smollm2-135m", "gemma3-270m")),
}


LEVER_COLUMNS = [  # issue 18's levers (cmpq_bench --suite levers), as the README names them
    ("+ sequential calibration", "sequential"),
    ("+ tuned tables (blocks, 48 steps)", "tuned tables: blocks 48"),
    ("+ tuned tables (model KL, 60 steps)", "tuned tables: model 60, lr 3e-4"),
    ("+ tuned tables (model KL, 60 steps, lr 1e-3)", "model 60, lr 1e-3"),
    ("+ tuned tables (model KL, 60 steps, relative lr)", "model 60, relative lr"),
    ("+ tuned tables (model KL, 60 steps, gap-relative lr)", "model 60, gap-relative lr"),
    ("+ tuned tables and norms (model KL, 60 steps, relative lr)", "model 60 + norms, relative lr"),
    (
        "+ tuned tables and outliers (model KL, 60 steps, relative lr)",
        "model 60 + outliers, relative lr",
    ),
    (
        "+ tuned tables and outliers (model KL, 60 steps, gap-relative lr)",
        "model 60 + outliers, gap-relative lr",
    ),
    (
        "+ tuned tables and outliers (model KL, 120 steps, relative lr)",
        "model 120 + outliers, relative lr",
    ),
    (
        "+ tuned tables and outliers, O_q 1 % (model KL, 60 steps, relative lr)",
        "model 60 + outliers, O_q 1 %",
    ),
    ("+ tuned tables (blocks 48 + model 60)", "blocks 48 + model 60"),
    ("+ sequential + tuned tables (blocks, 48 steps)", "sequential + blocks 48"),
]


def levers(model: str = "smollm2-135m") -> list[str]:
    """WikiText-2 perplexity of the defaults without model tuning and of each lever on
    top, with the quantization seconds (calibration statistics shared, so not counted)."""
    measured = by_setting(load(f"levers-{model}-column"))
    defaults = by_setting(load(f"peers-{model}"))
    budgets = sorted({e["config"]["bits"] for e in measured.values()})
    columns = [  # the levers measured on this model
        (setting, label)
        for setting, label in LEVER_COLUMNS
        if any(f"{bits} bits: {setting}" in measured for bits in budgets)
    ]
    lines = [
        "| bits | defaults, no model tuning | "
        + " | ".join(label for _, label in columns)
        + " | commits |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for bits in budgets:
        default = defaults.get(f"{DEFAULT}{bits}{UNTUNED}") or defaults[f"{DEFAULT}{bits}"]
        assert not default["config"].get("tune_model"), f"{bits}-bit baseline is tuned"
        cells, commits = [f"{default['wikitext2']:.2f} ({default['seconds']:.0f} s)"], []
        for setting, _ in columns:
            entry = measured.get(f"{bits} bits: {setting}")
            cells.append(f"{entry['wikitext2']:.2f} ({entry['seconds']:.0f} s)" if entry else "—")
            commits += [commit_of(entry)] if entry else []
        commit_cell = f"{commit_of(default)} / {' '.join(sorted(set(commits)))}"
        lines.append(f"| {bits} | " + " | ".join(cells) + f" | {commit_cell} |")
    return lines


RD_FISHER = "defaults, rd-fisher allocation"  # the levers suite's setting, after "B bits: "


def rd_fisher(models: tuple[str, ...]) -> list[str]:
    """The default rows (rd-layer) beside the same defaults with rd-fisher allocation:
    WikiText-2 / C4 perplexity and the quantization seconds (statistics not counted)."""
    lines = [
        "| model | bits | rd-layer (defaults) | rd-fisher | seconds | commits |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        measured = by_setting(load(f"levers-{model}-column"))
        defaults = by_setting(load(f"peers-{model}"))
        for setting, entry in sorted(measured.items(), key=lambda item: item[1]["bits"]):
            if not setting.endswith(f" bits: {RD_FISHER}"):
                continue
            bits = entry["config"]["bits"]
            default = defaults[f"{DEFAULT}{bits}"]
            lines.append(
                f"| {model} | {bits} | {default['wikitext2']:.2f} / {default['c4']:.2f} "
                f"| {entry['wikitext2']:.2f} / {entry['c4']:.2f} "
                f"| {default['seconds']:.0f} / {entry['seconds']:.0f} "
                f"| {commit_of(default)} / {commit_of(entry)} |"
            )
    return lines


def render(text: str) -> str:
    """``text`` (the README) with every generated block rewritten."""

    def block(match: re.Match) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise SystemExit(f"README.md names an unknown generated block {name!r}")
        return match.group(1) + "\n".join(BLOCKS[name]()) + "\n" + match.group(4)

    return BLOCK.sub(block, text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    text = README.read_text()
    fresh = render(text)
    if args.check:
        sys.exit(0 if fresh == text else 1)
    README.write_text(fresh)
    print(f"wrote {README.relative_to(ROOT)}" if fresh != text else "README.md is up to date")


if __name__ == "__main__":
    main()
