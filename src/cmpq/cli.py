"""The ``cmpq`` command line: a thin layer over the public API.

User mistakes surface as one ``error: ...`` line on stderr and exit code 2;
options are checked before any model is loaded, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .checkpoint import check_output_dir, save_quantized
from .config import RTNConfig
from .data import BUILTIN_DATASETS, load_documents
from .errors import CmpqError
from .evaluate import perplexity
from .models import DEFAULT_MODEL, load_model, quantizable_linears
from .quantize import quantize

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
    if path:
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


def cmd_quantize(args: argparse.Namespace) -> None:
    bits = int(args.bits) if float(args.bits).is_integer() else args.bits
    config = RTNConfig(bits=bits, group_size=args.group_size, include_lm_head=args.include_lm_head)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    model, tokenizer = load_model(args.model)
    report = quantize(model, config)
    save_quantized(model, tokenizer, report, out, overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {out}")
    _write_json(args.json, {"model": args.model, "out": str(out), **report.as_dict()})


def cmd_demo(args: argparse.Namespace) -> None:
    """Evaluate the default model, quantize it with RTN, evaluate again."""
    model, tokenizer = load_model(args.model)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    fp = perplexity(model, tokenizer, args.dataset, args.seqlen, args.windows, args.model)
    config = RTNConfig(bits=3, group_size=64)
    report = quantize(model, config)
    rtn = perplexity(model, tokenizer, args.dataset, args.seqlen, args.windows, "rtn")
    print()
    print(f"{args.model}, {args.dataset}, {fp.windows} x {fp.seqlen} tokens, decoder linears only:")
    print(f"{'model':<22}{'bits/weight':>12}{'size (MB)':>12}{'perplexity':>12}")
    _print_row("fp16 reference", 16.0, params * 2, fp.ppl)
    label = f"RTN {config.bits}-bit g{config.group_size}"
    _print_row(label, report.effective_bits, report.stored_bytes, rtn.ppl)


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
    quant.add_argument("--method", choices=["rtn"], default="rtn")
    quant.add_argument("--bits", type=float, default=3, help="bits per code (2-8)")
    quant.add_argument(
        "--group-size", type=_group_size, default=64, help="columns per group, or 'channel' (64)"
    )
    quant.add_argument("--include-lm-head", action="store_true", help="quantize lm_head too")
    quant.add_argument("--out", required=True, help="output directory")
    quant.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    quant.add_argument("--json", help="write the quantization report as JSON to this file")
    quant.set_defaults(func=cmd_quantize)

    demo = commands.add_parser("demo", help="quantize the default model and compare perplexity")
    demo.add_argument("--model", default=DEFAULT_MODEL)
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
