"""The ``cmpq`` command line: a thin layer over the public API.

User mistakes surface as one ``error: ...`` line on stderr and exit code 2;
options are checked before any model is loaded, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path

from . import __version__
from .allocate import ALLOCATIONS, LAYOUTS
from .calibrate import STATISTICS
from .checkpoint import WEIGHTS_FILE, check_output_dir, save_quantized
from .config import CMPQConfig, RTNConfig
from .data import BUILTIN_DATASETS, load_documents
from .errors import CmpqError
from .evaluate import perplexity
from .generation import check_generation_options, generate
from .inspection import HEATMAP_FILE, as_dict, draw_heatmap, format_table, inspect_output
from .models import DEFAULT_MODEL, load_model, quantizable_linears
from .quantize import quantize
from .sizing import bits_for_size, parse_size

EXIT_USER_ERROR = 2


def _group_size(value: str) -> int | None:
    if value == "channel":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of columns or 'channel', got {value!r}"
        ) from None


def _write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path``; ``-`` means standard output."""
    if path == "-":
        print(json.dumps(payload, indent=2))
    elif path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _check_dataset(spec: str) -> None:
    if spec not in BUILTIN_DATASETS:
        load_documents(spec)  # raises a clear error for a missing or empty file


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="wikitext2",
        help=f"{' | '.join(BUILTIN_DATASETS)} | PATH (.txt/.jsonl)",
    )
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (512)")
    parser.add_argument("--windows", type=int, default=40, help="number of windows (40)")


def cmd_eval(args: argparse.Namespace) -> None:
    _check_dataset(args.dataset)
    model, tokenizer = load_model(args.model)
    result = perplexity(model, tokenizer, args.dataset, args.seqlen, args.windows, args.model)
    print(result.summary())
    _write_json(args.json, result.as_dict())


def config_from_args(args: argparse.Namespace):
    """The method config the options describe (validated by the config itself)."""
    if args.method == "rtn":
        bits = 3 if args.bits is None else args.bits
        bits = int(bits) if float(bits).is_integer() else bits
        return RTNConfig(
            bits=bits, group_size=args.group_size, include_lm_head=args.include_lm_head
        )
    if args.include_lm_head:
        raise CmpqError("--include-lm-head is supported with --method rtn only")
    _check_dataset(args.calib)
    return CMPQConfig(
        bits=CMPQConfig.bits if args.bits is None else args.bits,
        layout=args.layout,
        statistic=args.statistic,
        outliers_act=args.outliers_act,
        outliers_q=args.outliers_q,
        mixed=not args.integer_only,
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        sequential=args.sequential,
        allocation=args.allocation,
        error_feedback=args.error_feedback,
        damp=args.damp,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    max_bytes = parse_size(args.max_size) if args.max_size is not None else None
    if max_bytes is not None and (args.method != "cmpq" or args.bits is not None):
        raise CmpqError("--max-size replaces --bits and works with --method cmpq only")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    model, tokenizer = load_model(args.model)
    if max_bytes is not None:
        config = dataclasses.replace(config, bits=bits_for_size(model, max_bytes))
    report = quantize(model, config, tokenizer=tokenizer)
    save_quantized(model, tokenizer, report, out, overwrite=args.overwrite)
    print(report.summary())
    result = {"model": args.model, "out": str(out), **report.as_dict()}
    if max_bytes is not None:
        size = (out / WEIGHTS_FILE).stat().st_size
        print(
            f"{WEIGHTS_FILE}: {size:,} bytes of the {max_bytes:,} allowed ({size / max_bytes:.2%})"
        )
        result.update(max_bytes=max_bytes, model_bytes=size)
    print(f"wrote {out}")
    _write_json(args.json, result)


def cmd_generate(args: argparse.Namespace) -> None:
    check_generation_options(args.max_new_tokens, args.temperature)
    model, tokenizer = load_model(args.model)
    print(args.prompt, end="", flush=True)
    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stream=True,
    )
    print(result.summary())
    _write_json(args.json, result.as_dict())


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print the per-layer table and draw the heat map (first, so a missing
    matplotlib fails before any output); with ``--json -`` standard output holds
    the JSON alone and the other messages go to stderr."""
    inspection = inspect_output(Path(args.dir))
    png = None if args.no_plot else Path(args.png or Path(args.dir) / HEATMAP_FILE)
    if png is not None:
        draw_heatmap(inspection, png)
    notes = sys.stderr if args.json == "-" else sys.stdout
    if args.json != "-":
        print(format_table(inspection))
    print("heat map skipped (--no-plot)" if png is None else f"wrote {png}", file=notes)
    _write_json(args.json, as_dict(inspection))


def cmd_demo(args: argparse.Namespace) -> None:
    """Evaluate the default model, then RTN 3-bit and CMPQ 2.5-bit copies of it."""
    evaluate = partial(perplexity, dataset=args.dataset, seqlen=args.seqlen, windows=args.windows)
    model, tokenizer = load_model(args.model)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    fp = evaluate(model, tokenizer, model_name=args.model)
    rows = [("fp16 reference", 16.0, params * 2, fp.ppl)]
    for label, config in [
        ("RTN 3-bit g64", RTNConfig(bits=3, group_size=64)),
        (f"CMPQ {args.bits:g} bits", CMPQConfig(bits=args.bits)),
    ]:
        model, tokenizer = load_model(args.model)
        report = quantize(model, config, tokenizer=tokenizer)
        result = evaluate(model, tokenizer, model_name=label)
        rows.append((label, report.effective_bits, report.stored_bytes, result.ppl))
    print()
    print(
        f"{args.model}, {args.dataset}, {fp.windows} x {fp.seqlen} tokens; bits and sizes "
        "count everything stored for the decoder linears:"
    )
    print(f"{'model':<22}{'bits/weight':>12}{'size (MB)':>12}{'perplexity':>12}")
    for row in rows:
        _print_row(*row)


def _print_row(label: str, bits: float, stored_bytes: int, ppl: float) -> None:
    print(f"{label:<22}{bits:>12.2f}{stored_bytes / 1e6:>12.2f}{ppl:>12.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmpq", description="Channel-wise mixed-precision quantization of LLMs."
    )
    parser.add_argument("--version", action="version", version=f"cmpq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="perplexity of a model or a quantized output")
    evaluate.add_argument("model", help="alias, checkpoint dir, cmpq output dir, .gguf or hub id")
    _add_eval_options(evaluate)
    evaluate.add_argument("--json", help="write the result as JSON to this file")
    evaluate.set_defaults(func=cmd_eval)

    quant = commands.add_parser("quantize", help="quantize a model and write it to --out")
    quant.add_argument("model", help="alias, checkpoint dir, .gguf or hub id")
    quant.add_argument("--method", choices=["cmpq", "rtn"], default="cmpq")
    quant.add_argument(
        "--bits",
        type=float,
        help="cmpq: total stored bits per weight, any number 2-8 (2.5); rtn: code bits 2-8 (3)",
    )
    quant.add_argument(
        "--max-size",
        help="cmpq: instead of --bits, the most bytes model.safetensors may take, "
        "embeddings and lm_head included (60MB, 600MiB, 1.5GB, or a byte count)",
    )
    quant.add_argument(
        "--group-size",
        type=_group_size,
        default=64,
        help="rtn: columns per group, or 'channel' (64)",
    )
    quant.add_argument("--include-lm-head", action="store_true", help="rtn: quantize lm_head too")
    defaults = CMPQConfig()
    cmpq_options = quant.add_argument_group("cmpq options")
    cmpq_options.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=defaults.layout,
        help="look-up tables per output row per bit-group, or per column",
    )
    cmpq_options.add_argument(
        "--statistic",
        choices=STATISTICS,
        default=defaults.statistic,
        help="activation statistic that ranks channels",
    )
    cmpq_options.add_argument(
        "--outliers-act",
        type=float,
        default=defaults.outliers_act,
        help="fraction of weights kept fp16 by activation magnitude",
    )
    cmpq_options.add_argument(
        "--outliers-q",
        type=float,
        default=defaults.outliers_q,
        help="fraction of weights kept fp16 by quantization error",
    )
    cmpq_options.add_argument(
        "--integer-only", action="store_true", help="one integer code width everywhere (ablation)"
    )
    cmpq_options.add_argument("--kmeans-iters", type=int, default=defaults.kmeans_iters)
    cmpq_options.add_argument("--seed", type=int, default=defaults.seed)
    cmpq_options.add_argument(
        "--calib", default=defaults.calib, help="calibration text: c4-train | wikitext2 | c4 | PATH"
    )
    cmpq_options.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    cmpq_options.add_argument("--calib-seqlen", type=int, default=defaults.calib_seqlen)
    cmpq_options.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate each block on the outputs of the quantized ones",
    )
    cmpq_options.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=defaults.allocation,
        help="paper: the same widths in every layer, extra bit to the loudest channels; "
        "rd: widths for all channels of all layers at once, by measured distortion per bit; "
        "rd-layer: the same trade within each layer, at the paper's budget per layer "
        "(default: %(default)s; the paper's method is --allocation paper --no-error-feedback)",
    )
    cmpq_options.add_argument(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=defaults.error_feedback,
        help="GPTQ-style feedback of each column's rounding error onto the columns after it "
        "(default: on; gathers XᵀX during calibration)",
    )
    cmpq_options.add_argument(
        "--damp",
        type=float,
        default=defaults.damp,
        help="error feedback: damping of XᵀX as a fraction of its mean diagonal",
    )
    quant.add_argument("--out", required=True, help="output directory")
    quant.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    quant.add_argument("--json", help="write the quantization report as JSON to this file")
    quant.set_defaults(func=cmd_quantize)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("model", help="alias, checkpoint dir, cmpq output dir, .gguf or hub id")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gen.add_argument("--json", help="write the text, speed and memory as JSON to this file")
    gen.set_defaults(func=cmd_generate)

    inspect = commands.add_parser(
        "inspect", help="per-layer widths and bytes of a quantized output, and a heat map"
    )
    inspect.add_argument("dir", help="a directory written by cmpq quantize (CMPQ, packed)")
    inspect.add_argument("--json", help="write the table as JSON to this file ('-': stdout)")
    plot = inspect.add_mutually_exclusive_group()
    plot.add_argument("--png", help=f"where to draw the heat map (DIR/{HEATMAP_FILE})")
    plot.add_argument("--no-plot", action="store_true", help="draw no heat map")
    inspect.set_defaults(func=cmd_inspect)

    demo = commands.add_parser("demo", help="quantize the default model and compare perplexity")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--bits", type=float, default=2.5, help="CMPQ total bits (2.5)")
    _add_eval_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CmpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
