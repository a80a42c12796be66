"""How fast and how small a quantized model runs: layers, whole models, perplexity by backend.

    python benchmarks/runtime_bench.py layers     # runtime-layers.{json,md,png}
    python benchmarks/runtime_bench.py models     # runtime-models.{json,md,png}
    python benchmarks/runtime_bench.py ppl        # runtime-ppl.{json,md}
    python benchmarks/runtime_bench.py all

``layers``: one linear of a 7-8B model's shapes (4096x4096, 11008x4096,
4096x11008, 14336x4096 as out x in) with synthetic codes and tables at 2.5,
3.0 and 4.0 mixed bits (2.5: half the columns at 2 bits, half at 3; 3.0: a
quarter at 2, half at 3, a quarter at 4; 4.0: a quarter at 3, half at 4, a
quarter at 5) and 0.3 % outliers, timed for 1, 8 and 512 tokens through each
backend, against torch's ``F.linear`` with dense float32, bfloat16 and float16
weights. GB/s is the bytes the layer stores (codes, tables, outliers,
metadata) over the time; the machine's copy bandwidth is measured in the same
run (STREAM's convention: bytes read plus bytes written, over the time). Each
call runs on the next of enough copies of the layer to fill 512 MB, so its
weights come from memory, not from the 32 MB L3 cache, as in a whole model.

``models``: for each model, each variant (float32, bfloat16, cmpq at 2.5, 3.0
and 4.0 bits through each backend, llama.cpp's Q4_K_M, Q2_K and IQ3_XXS
through ``llama-bench``) in its own process: resident memory above the bare
process (torch, transformers and cmpq imported) after loading and after
generating; decode tokens/s (64 new tokens, greedy, after a 16-token prompt);
prefill tokens/s (one 512-token WikiText-2 window). cmpq outputs are loaded
as a user loads them (``cmpq.load``: embeddings and lm_head in bfloat16).

``ppl``: WikiText-2 perplexity (40 x 512) of each cmpq output through each
backend, with the embeddings in float32 (exact: the backends must agree) and
in bfloat16 (what ``cmpq.load`` does by default).

The cmpq outputs are quantized once with the defaults into
``$CMPQ_CACHE/runtime-bench/`` (calibration statistics from the benchmarks'
cache) and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from results import ResultsFile

HERE = Path(__file__).resolve().parent
LAYER_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
MIXES = {2.5: {2: 0.5, 3: 0.5}, 3.0: {2: 0.25, 3: 0.5, 4: 0.25}, 4.0: {3: 0.25, 4: 0.5, 5: 0.25}}
LAYER_TOKENS = (1, 8, 512)
OUTLIER_FRACTION = 0.003
MODELS = ("smollm2-135m", "gemma3-270m")
CMPQ_BITS = (2.5, 3.0, 4.0)
GGUF_TYPES = ("Q4_K_M", "Q2_K", "IQ3_XXS")
PROMPT = "The history of the city begins in the"
NEW_TOKENS = 64
PREFILL_TOKENS = 512


def backends_here() -> list[str]:
    """The backends that can run here (the torch reference always)."""
    from cmpq.runtime import cpu_kernel

    names = ["torch"]
    if cpu_kernel.unavailable_reason() is None:
        names.insert(0, "cpu")
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            names.insert(0, "triton")
        except ImportError:
            pass
    return names


def timed(function, min_seconds: float = 0.5, min_calls: int = 3) -> float:
    """Median seconds of a call (after one warm-up), repeated for about ``min_seconds``."""
    function()
    times = []
    while len(times) < min_calls or sum(times) < min_seconds:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read plus written per second copying a 256 MB buffer (torch's threads)."""
    source = torch.ones(256 * 2**20, dtype=torch.uint8)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), min_seconds=1.0)
    return 2 * source.numel() / seconds


def synthetic_layer(out_features: int, in_features: int, mix: dict[int, float], seed: int = 0):
    """Stored tensors of a random column-layout layer: any code byte is a valid code."""
    from cmpq.format.packing import pack_codes, tiled_nbytes
    from cmpq.format.spec import group_index_bits, stored_dtypes

    gen = torch.Generator().manual_seed(seed)
    dtypes = stored_dtypes(in_features)
    sizes = [round(in_features * share) for share in mix.values()]
    sizes[-1] = in_features - sum(sizes[:-1])
    widths = list(mix)
    code_bytes = sum(tiled_nbytes(out_features, n, b) for b, n in zip(widths, sizes, strict=True))
    entries = sum(n * 2**b for b, n in zip(widths, sizes, strict=True))
    outliers = round(OUTLIER_FRACTION * out_features * in_features)
    where = torch.randperm(out_features * in_features, generator=gen)[:outliers].sort().values
    counts = torch.bincount(where // in_features, minlength=out_features)
    return {
        "codes": torch.randint(0, 256, (code_bytes,), dtype=torch.uint8, generator=gen),
        "lut": (0.02 * torch.randn(entries, generator=gen)).to(torch.float16),
        "column_groups": pack_codes(
            torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[
                torch.randperm(in_features, generator=gen)
            ],
            group_index_bits(len(sizes)),
        ),
        "group_bits": torch.tensor(widths, dtype=torch.uint8),
        "group_sizes": torch.tensor(sizes, dtype=torch.int32),
        "outlier_counts": counts.to(dtypes["outlier_counts"]),
        "outlier_cols": (where % in_features).to(dtypes["outlier_cols"]),
        "outlier_values": (0.1 * torch.randn(outliers, generator=gen)).to(torch.float16),
    }


def bench_layers(args) -> None:
    from cmpq.runtime.qlinear import QuantizedLinear, set_backend

    command = "python benchmarks/runtime_bench.py layers"
    results = ResultsFile.open("runtime-layers", command, resume=False)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    backends = [b for b in backends_here() if b != "torch"] + ["torch"]
    for out_features, in_features in LAYER_SHAPES:
        dense = torch.randn(out_features, in_features) * 0.02
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            weights = rotation(dense.to(dtype))
            nbytes = weights[0].numel() * weights[0].element_size()
            for tokens in LAYER_TOKENS:
                inputs = torch.randn(tokens, in_features).to(dtype)
                seconds = timed_rotating(
                    weights, lambda w, i=inputs: torch.nn.functional.linear(i, w)
                )
                results.rows.append(
                    layer_row(out_features, in_features, tokens, str(dtype)[6:], None, seconds,
                              nbytes, bandwidth, len(weights))
                )  # fmt: skip
                print_row(results.rows[-1])
            del weights
            gc.collect()
        del dense
        for bits, mix in MIXES.items():
            tensors = synthetic_layer(out_features, in_features, mix)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            modules = [
                QuantizedLinear(copied, out_features, in_features, "column")
                for copied in rotation(tensors)
            ]
            for backend in backends:
                with torch.no_grad():
                    for module in modules:  # what a first call prepares, prepared for all
                        set_backend(module, backend)
                        module(torch.zeros(1, in_features))
                for tokens in LAYER_TOKENS:
                    if backend == "torch" and (bits != 2.5 or tokens == 8):
                        continue  # the reference: one width, decode and prefill
                    x = torch.randn(tokens, in_features)
                    with torch.no_grad():
                        seconds = timed_rotating(modules, lambda m, i=x: m(i))
                    results.rows.append(
                        layer_row(out_features, in_features, tokens, f"cmpq {bits:g}", backend,
                                  seconds, nbytes, bandwidth, len(modules))
                    )  # fmt: skip
                    print_row(results.rows[-1])
            del modules
            gc.collect()
        results.write(layer_table(results.rows, bandwidth), plot=plot_layers)


ROTATION_BYTES = 512 * 2**20  # copies of a layer cycled through: 16x this CPU's L3


def rotation(weights):
    """Copies of a weight tensor (or a dict of them) adding up to at least
    :data:`ROTATION_BYTES`, so that a call finds its layer in memory, not in the
    cache, as each layer of a whole 7-8B model would be."""
    tensors = list(weights.values()) if isinstance(weights, dict) else [weights]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    count = max(2, -(-ROTATION_BYTES // nbytes))
    if isinstance(weights, dict):
        return [{k: v.clone() for k, v in weights.items()} for _ in range(count)]
    return [weights.clone() for _ in range(count)]


def timed_rotating(items: list, call) -> float:
    """Median seconds of ``call(item)``, each call on the next item of ``items``."""
    state = {"next": 0}

    def one() -> None:
        call(items[state["next"] % len(items)])
        state["next"] += 1

    return timed(one, min_seconds=0.5, min_calls=len(items) if len(items) <= 64 else 8)


def layer_row(out_f, in_f, tokens, weights, backend, seconds, nbytes, bandwidth, copies) -> dict:
    return ResultsFile.stamp(
        {
            "copies": copies,
            "shape": f"{out_f}x{in_f}",
            "tokens": tokens,
            "weights": weights,
            "backend": backend or "torch F.linear",
            "ms": seconds * 1e3,
            "stored_bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9,
            "copy_gb_per_s": bandwidth / 1e9,
        }
    )


def print_row(row: dict) -> None:
    print(
        f"{row['shape']:>11} {row['tokens']:>4} {row['weights']:>9} {row['backend']:>15} "
        f"{row['ms']:9.3f} ms {row['gb_per_s']:6.1f} GB/s",
        flush=True,
    )


def layer_table(rows: list[dict], bandwidth: float) -> list[str]:
    lines = [
        f"Copy bandwidth measured in the same run: {bandwidth / 1e9:.1f} GB/s (bytes read + "
        "written per second). GB/s: the bytes the weights occupy over the time. Speed-up: "
        "against dense float32 and against the fastest dense dtype at the same shape and tokens. "
        "Every call runs on the next of several copies of the layer filling 512 MB, so the "
        "weights come from memory, not from the cache.",
        "",
        "| shape (out x in) | tokens | weights | backend | ms | GB/s | % of copy bw | "
        "x fp32 | x fastest dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = [r for r in rows if r["shape"] == row["shape"] and r["tokens"] == row["tokens"]]
        dense = {r["weights"]: r["ms"] for r in same if r["backend"] == "torch F.linear"}
        fastest = min(dense.values())
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['weights']} | {row['backend']} | "
            f"{row['ms']:.3f} | {row['gb_per_s']:.1f} | "
            f"{100 * row['gb_per_s'] / row['copy_gb_per_s']:.0f} % | "
            f"{dense['float32'] / row['ms']:.2f} | {fastest / row['ms']:.2f} |"
        )
    return lines


def plot_layers(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ResultsFile.open("runtime-layers", None).rows
    decode = [r for r in rows if r["tokens"] == 1]
    labels = sorted({(r["weights"], r["backend"]) for r in decode})
    shapes = list(dict.fromkeys(r["shape"] for r in decode))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(labels)
    for k, (weights, backend) in enumerate(labels):
        values = [
            next((r["ms"] for r in decode if r["shape"] == s and r["weights"] == weights
                  and r["backend"] == backend), 0)
            for s in shapes
        ]  # fmt: skip
        axis.bar([i + k * width for i in range(len(shapes))], values, width,
                 label=f"{weights} ({backend})")  # fmt: skip
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
    axis.set_ylabel("ms per token (decode, 1 token)")
    axis.set_yscale("log")
    axis.legend(fontsize=7, ncol=2)
    axis.set_title("One linear of a 7-8B model: time for one token")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- whole models ----------------------------------------------------------------------


def output_dir(model: str, bits: float) -> Path:
    from cmpq.models.sources import cache_dir

    return cache_dir() / "runtime-bench" / f"{model}-{bits:g}"


def ensure_output(model: str, bits: float) -> Path:
    """A default cmpq output of ``model`` at ``bits``, quantized once and cached."""
    from cmpq import CMPQConfig, quantize, save_quantized
    from cmpq.models.sources import load_pretrained

    out = output_dir(model, bits)
    if (out / "model.safetensors").is_file():
        return out
    sys.path.insert(0, str(HERE))
    from cmpq_bench import calibration_stats

    fp_model, tokenizer = load_pretrained(model)
    stats, _ = calibration_stats(fp_model, tokenizer, model, gram=True)
    report = quantize(fp_model, CMPQConfig(bits=bits), tokenizer=tokenizer, stats=stats)
    save_quantized(fp_model, tokenizer, report, out, overwrite=True)
    return out


def measure_child(spec: dict) -> dict:
    """In a fresh process: load one variant, measure memory, decode and prefill.

    The bare process has imported torch, transformers and cmpq, loaded the tokenizer and
    built the model on the meta device (so the modelling code and what it imports are
    loaded too): what loading adds above that is the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cmpq.calib.text import cut_windows, load_text
    from cmpq.eval.generation import generate
    from cmpq.memory import resident_bytes
    from cmpq.models.conventions import needs_bos
    from cmpq.models.sources import alias_checkpoint
    from cmpq.runtime.checkpoint import load_quantized

    quantized = spec["variant"].startswith("cmpq")
    source = spec["path"] if quantized else str(alias_checkpoint(spec["model"]))
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    gc.collect()
    baseline = resident_bytes()
    start = time.perf_counter()
    if quantized:
        model, _ = load_quantized(Path(source), spec["backend"], with_tokenizer=False)
    else:
        dtype = getattr(torch, spec["variant"])
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    load_seconds = time.perf_counter() - start
    gc.collect()
    after_load = resident_bytes() - baseline
    result = generate(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS)
    after_generate = resident_bytes() - baseline  # before the prefill's 512 x vocab logits
    ids = tokenizer(load_text("wikitext2")[:20000], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if needs_bos(tokenizer, model) else None
    window = cut_windows(torch.tensor(ids), PREFILL_TOKENS, 1, bos)[:1]
    with torch.no_grad():
        prefill = timed(lambda: model(window), min_seconds=2.0, min_calls=2)
    return {
        "load_seconds": load_seconds,
        "resident_after_load": after_load,
        "resident_after_generate": after_generate,
        "decode_tokens_per_s": result.decode_tokens_per_second,
        "new_tokens": result.new_tokens,
        "prefill_tokens_per_s": PREFILL_TOKENS / prefill,
    }


def run_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench_rows(model: str) -> list[dict]:
    """llama.cpp's Q4_K_M, Q2_K and IQ3_XXS of the same model through llama-bench."""
    sys.path.insert(0, str(HERE))
    from cmpq import CMPQConfig
    from cmpq.models.sources import cache_dir, load_pretrained
    from cmpq.quant.pipeline import calibration_batch

    from peers.peers import PeerContext, llama_cpp_binaries, llama_cpp_prepared, run_tool

    binaries = llama_cpp_binaries()
    if not (binaries / "llama-bench").is_file():
        print("llama-bench not built: llama.cpp rows skipped")
        return []
    workdir = cache_dir() / "runtime-bench" / f"{model}-llama.cpp" / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    fp_model, tokenizer = load_pretrained(model)
    context = PeerContext(model, calibration_batch(tokenizer, fp_model, CMPQConfig()), tokenizer,
                          workdir)  # fmt: skip
    fp32, imatrix, _ = llama_cpp_prepared(context, binaries)
    rows = []
    threads = torch.get_num_threads()
    for kind in GGUF_TYPES:
        path = workdir.parent / f"{kind}.gguf"
        if not path.is_file():
            run_tool([binaries / "llama-quantize", "--imatrix", imatrix, fp32, path, kind, threads],
                     workdir / "log")  # fmt: skip
        done = subprocess.run(
            [str(binaries / "llama-bench"), "-m", str(path), "-p", str(PREFILL_TOKENS),
             "-n", str(NEW_TOKENS), "-t", str(threads), "-o", "json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        speeds = {
            ("prefill" if entry["n_prompt"] else "decode"): entry["avg_ts"]
            for entry in json.loads(done.stdout)
        }
        rows.append(
            {
                "variant": f"llama.cpp {kind}",
                "backend": "llama-bench",
                "file_bytes": path.stat().st_size,
                "decode_tokens_per_s": speeds["decode"],
                "prefill_tokens_per_s": speeds["prefill"],
            }
        )
    return rows


def bench_models(args) -> None:
    command = "python benchmarks/runtime_bench.py models"
    results = ResultsFile.open("runtime-models", command, resume=False)
    for model in args.models:
        variants = [{"model": model, "variant": v} for v in ("float32", "bfloat16")]
        for bits in CMPQ_BITS:
            path = ensure_output(model, bits)
            for backend in backends_here():
                variants.append(
                    {"model": model, "variant": f"cmpq {bits:g}", "backend": backend,
                     "path": str(path), "file_bytes": (path / "model.safetensors").stat().st_size}
                )  # fmt: skip
        for spec in variants:
            measured = run_child(spec)
            row = ResultsFile.stamp({**spec, **measured})
            results.rows.append(row)
            print(json.dumps({k: row[k] for k in (*spec, *measured) if k != "path"}), flush=True)
            results.write(model_table(results.rows), plot=plot_models)
        if not args.no_llama_cpp:
            for row in llama_bench_rows(model):
                results.rows.append(ResultsFile.stamp({"model": model, **row}))
                results.write(model_table(results.rows), plot=plot_models)


def model_table(rows: list[dict]) -> list[str]:
    lines = [
        f"Resident memory above the bare process (torch, transformers, cmpq imported, the "
        "tokenizer loaded, the model built on the meta device), greedy "
        f"decode of {NEW_TOKENS} new tokens after a short prompt, prefill of one "
        f"{PREFILL_TOKENS}-token WikiText-2 window; torch's default threads. cmpq outputs "
        "loaded by `cmpq.load` (embeddings and lm_head in bfloat16). llama.cpp rows: "
        "`llama-bench -p 512 -n 64` at the same thread count (its build uses the CPU's "
        "native instruction set).",
        "",
        "| model | variant | backend | model.safetensors MB | resident after load MB | "
        "resident after generate MB | x file | decode tokens/s | prefill tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        file_mb = row.get("file_bytes", 0) / 1e6
        after_load = row.get("resident_after_load")
        after = row.get("resident_after_generate")
        ratio = f"{after / row['file_bytes']:.2f}" if after and row.get("file_bytes") else "—"
        lines.append(
            f"| {row['model']} | {row['variant']} | {row.get('backend', 'torch')} | "
            f"{file_mb:.1f} | "
            f"{'—' if after_load is None else f'{after_load / 1e6:.0f}'} | "
            f"{'—' if after is None else f'{after / 1e6:.0f}'} | {ratio} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['prefill_tokens_per_s']:.0f} |"
        )
    return lines


def plot_models(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ResultsFile.open("runtime-models", None).rows
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        for row in (r for r in rows if r["model"] == model):
            memory = row.get("resident_after_generate", row.get("file_bytes", 0)) / 1e6
            label = f"{row['variant']} ({row.get('backend', 'torch')})"
            axis.scatter(memory, row["decode_tokens_per_s"], s=25)
            axis.annotate(label, (memory, row["decode_tokens_per_s"]), fontsize=6)
        axis.set_xlabel("resident MB after generating (llama.cpp: file MB)")
        axis.set_ylabel("decode tokens/s")
        axis.set_xscale("log")
        axis.set_title(model)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- perplexity by backend -------------------------------------------------------------


def bench_ppl(args) -> None:
    import cmpq

    command = "python benchmarks/runtime_bench.py ppl --ppl-bits BITS..."
    results = ResultsFile.open("runtime-ppl", command)  # rows of other bits stay
    for model in args.models:
        for bits in args.ppl_bits:
            path = ensure_output(model, bits)
            for embedding_dtype in ("float32", "bfloat16"):
                for backend in backends_here():
                    if embedding_dtype == "bfloat16" and backend == "torch":
                        continue  # the reference runs exact embeddings only
                    loaded, tokenizer = cmpq.load(path, backend, embedding_dtype)
                    start = time.perf_counter()
                    result = cmpq.perplexity(loaded, tokenizer, "wikitext2", 512, 40, model)
                    row = ResultsFile.stamp(
                        {"model": model, "bits": bits, "backend": backend,
                         "embedding_dtype": embedding_dtype, "ppl": result.ppl,
                         "seconds": time.perf_counter() - start}
                    )  # fmt: skip
                    key = ("model", "bits", "backend", "embedding_dtype")
                    results.rows = [r for r in results.rows if any(r[k] != row[k] for k in key)] + [
                        row
                    ]
                    shown = (*key, "ppl", "seconds")
                    print(json.dumps({k: row[k] for k in shown}), flush=True)
                    results.write(ppl_table(results.rows))
                    del loaded
                    gc.collect()


def ppl_table(rows: list[dict]) -> list[str]:
    lines = [
        "WikiText-2 (raw test), 40 x 512 tokens, cmpq's evaluator. Reference: the torch "
        "backend with float32 embeddings.",
        "",
        "| model | bits | backend | embeddings | perplexity | vs reference | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reference = next(
            (r["ppl"] for r in rows if r["model"] == row["model"] and r["bits"] == row["bits"]
             and r["backend"] == "torch" and r["embedding_dtype"] == "float32"), None
        )  # fmt: skip
        change = f"{100 * (row['ppl'] / reference - 1):+.3f} %" if reference else "—"
        lines.append(
            f"| {row['model']} | {row['bits']:g} | {row['backend']} | {row['embedding_dtype']} | "
            f"{row['ppl']:.3f} | {change} | {row['seconds']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=["layers", "models", "ppl", "all", "child"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--ppl-bits", nargs="+", type=float, default=list(CMPQ_BITS))
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama-bench rows")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.suite == "child":
        print(json.dumps(measure_child(json.loads(args.spec))))
        return
    if args.suite in ("layers", "all"):
        bench_layers(args)
    if args.suite in ("models", "all"):
        bench_models(args)
    if args.suite in ("ppl", "all"):
        bench_ppl(args)


if __name__ == "__main__":
    main()
