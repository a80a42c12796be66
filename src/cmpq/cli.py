"""The ``cmpq`` command line: a thin layer over the public API.

The quantization options are generated from the config dataclasses
(:mod:`cmpq.config`: each field's type, default, choices and help), so an
option is declared once. User mistakes surface as one ``error: ...`` line on
stderr and exit code 2, in the CLI's own words: the parameters a library
message names (`` `bits` ``) are printed as their flags (``--bits``). Options
are checked before any model is loaded, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import warnings
from functools import partial
from pathlib import Path

from . import __version__
from .alloc.size import parse_size
from .api import (
    EXECUTORS,
    generate,
    load_model,
    make_executor,
    perplexity,
    quantize,
    quantize_checkpoint,
)
from .calib.text import BUILTIN_DATASETS, load_documents
from .config import CMPQConfig, RTNConfig
from .errors import CmpqError, CmpqWarning
from .format.shards import weight_files
from .inspection import HEATMAP_FILE, as_dict, draw_heatmap, format_table, inspect_output
from .memory import resident_bytes
from .models.graph import quantizable_linears
from .models.sources import DEFAULT_MODEL
from .runtime.backends import BACKENDS
from .runtime.embeddings import EMBEDDING_DTYPES

EXIT_USER_ERROR = 2
CONFIGS = {"cmpq": CMPQConfig, "rtn": RTNConfig}
# API parameters that are not config fields, as the CLI spells them
COMMAND_FLAGS = {
    "max_size": "--max-size",
    "max_shard_size": "--max-shard-size",
    "resume": "--resume",
    "device": "--device",
    "executor": "--executor",
    "hidden_dtype": "--hidden-dtype",
    "ray_address": "--ray-address",
    "out": "--out",
    "overwrite": "--overwrite",
    "seqlen": "--seqlen",
    "windows": "--windows",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
}


# --- options generated from the config dataclasses -------------------------------------


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def flag_of(parameter: str) -> str | None:
    """The flag that sets API parameter ``parameter``, if the CLI has one."""
    for config in CONFIGS.values():
        for field in dataclasses.fields(config):
            if field.name == parameter:
                return _flag(field)
    return COMMAND_FLAGS.get(parameter)


def in_cli_words(message: str) -> str:
    """A library message with the parameters it names (`` `bits` ``) written as the
    flags that set them (``--bits``); a parameter the CLI has no flag for keeps its name."""

    def flag(match: re.Match) -> str:
        return flag_of(match.group(1)) or match.group(1)

    return re.sub(r"`([a-z_]+)`", flag, message)


def _none_or(word: str, kind: type):
    def parse(value: str) -> int | float | None:
        if value == word:
            return None
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number or {word!r}, got {value!r}"
            ) from None

    return parse


def _argument(field: dataclasses.Field, help_text: str) -> dict:
    """argparse keywords for one config field (no default: only given options are set)."""
    # argparse reads % in help as a format: the help says "0.4 %"
    help_text = help_text.replace("%", "%%")
    options = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
    if isinstance(field.default, bool):
        if field.metadata.get("optional"):
            return {**options, "action": argparse.BooleanOptionalAction}
        return {
            **options,
            "action": "store_false" if field.metadata.get("negate") else "store_true",
        }
    if "none" in field.metadata:
        kind = float if str(field.type).startswith("float") else int
        return {**options, "type": _none_or(field.metadata["none"], kind)}
    if "choices" in field.metadata:
        options["choices"] = field.metadata["choices"]
    return {**options, "type": type(field.default)}


def _help(field: dataclasses.Field) -> str:
    if isinstance(field.default, bool) and not field.metadata.get("optional"):
        return field.metadata["help"]
    default = field.metadata["none"] if field.default is None else field.default
    return f"{field.metadata['help']} (default: {default})"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field; a field both methods have (``bits``) is one
    option whose help gives each method's meaning."""
    by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, config in CONFIGS.items():
        for field in dataclasses.fields(config):
            by_name.setdefault(field.name, []).append((method, field))
    groups = {method: parser.add_argument_group(f"{method} options") for method in CONFIGS}
    for owners in by_name.values():
        method, field = owners[0]
        if len(owners) > 1:
            text = "; ".join(f"{m}: {_help(f)}" for m, f in owners)
            kinds = {type(f.default) for _, f in owners}
            option = {**_argument(field, text), "type": float if float in kinds else int}
            parser.add_argument(_flag(field), **option)
        else:
            groups[method].add_argument(_flag(field), **_argument(field, _help(field)))


def config_from_args(args: argparse.Namespace):
    """The method config the given options describe (validated by the config itself)."""
    config = CONFIGS[args.method]
    own = {field.name: field for field in dataclasses.fields(config)}
    given = {name: getattr(args, name) for name in _config_names() if hasattr(args, name)}
    for name in given:
        if name not in own:
            other = next(m for m, c in CONFIGS.items() if name in _names(c))
            raise CmpqError(f"{flag_of(name)} applies to --method {other} only")
    for name, value in given.items():  # an int field given as a float option (rtn --bits)
        if isinstance(own[name].default, int) and isinstance(value, float) and value.is_integer():
            given[name] = int(value)
    if "calib" in given:
        _check_dataset(given["calib"])
    return config(**given)


def _names(config) -> set[str]:
    return {field.name for field in dataclasses.fields(config)}


def _config_names() -> set[str]:
    return set().union(*(_names(config) for config in CONFIGS.values()))


# --- commands -------------------------------------------------------------------------


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


def _add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=None,
        help="what runs a cmpq output's quantized linears: auto (default, or $CMPQ_BACKEND), "
        "cpu (compiled kernel), triton (GPU), torch (reference)",
    )
    parser.add_argument(
        "--embedding-dtype",
        choices=list(EMBEDDING_DTYPES),
        default="bfloat16",
        help="a cmpq output's embeddings and lm_head: bfloat16 (default: half the memory, "
        "faster) or float32 (the stored fp16 values exactly)",
    )


def cmd_eval(args: argparse.Namespace) -> None:
    _check_dataset(args.dataset)
    model, tokenizer = load_model(args.model, args.backend, args.embedding_dtype)
    result = perplexity(model, tokenizer, args.dataset, args.seqlen, args.windows, args.model)
    print(result.summary())
    _write_json(args.json, result.as_dict())


def cmd_quantize(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    max_bytes = parse_size(args.max_size) if args.max_size is not None else None
    if max_bytes is not None and (args.method != "cmpq" or hasattr(args, "bits")):
        raise CmpqError("--max-size replaces --bits and works with --method cmpq only")
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size is not None else None
    out = Path(args.out)
    report = quantize_checkpoint(
        args.model,
        out,
        config,
        max_bytes=max_bytes,
        overwrite=args.overwrite,
        resume=args.resume,
        max_shard_size=max_shard,
        device=args.device,
        executor=make_executor(args.executor, args.ray_address),
        hidden_dtype=args.hidden_dtype,
    )
    print(report.summary())
    result = {"model": args.model, "out": str(out), **report.as_dict()}
    if max_bytes is not None:
        size = sum(f.stat().st_size for f in weight_files(out))
        print(f"weights: {size:,} bytes of the {max_bytes:,} allowed ({size / max_bytes:.2%})")
        result.update(max_bytes=max_bytes, model_bytes=size)
    print(f"wrote {out}")
    _write_json(args.json, result)


def cmd_generate(args: argparse.Namespace) -> None:
    from .eval.generation import check_generation_options

    check_generation_options(args.max_new_tokens, args.temperature)
    baseline = resident_bytes()
    model, tokenizer = load_model(args.model, args.backend, args.embedding_dtype)
    print(args.prompt, end="", flush=True)
    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stream=True,
        baseline_bytes=baseline,
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
    """Evaluate the default model, then RTN 3-bit and CMPQ copies of it."""
    start = time.perf_counter()
    evaluate = partial(perplexity, dataset=args.dataset, seqlen=args.seqlen, windows=args.windows)
    model, tokenizer = load_model(args.model)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    fp = evaluate(model, tokenizer, model_name=args.model)
    rows = [("full precision (fp32)", 32.0, params * 4, fp.ppl)]
    for label, config in [
        ("RTN 3-bit g64", RTNConfig(bits=3, group_size=64)),
        (f"CMPQ {args.bits:g} bits", demo_config(args.bits, args.calib_samples)),
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
    print(f"{'model':<24}{'bits/weight':>12}{'size (MB)':>12}{'perplexity':>12}")
    for row in rows:
        _print_row(*row)
    print(demo_calibration_note(args.model, args.bits, args.calib_samples))
    print(f"demo took {time.perf_counter() - start:.0f} s")


# `python benchmarks/command_bench.py calibration` on the default model at the demo's bits
# (WikiText-2 40 x 512, as the demo measures); tests/test_cli.py checks these against
# benchmarks/results/calibration-smollm2-135m.json
DEMO_CALIBRATION = {
    "model": "smollm2-135m",
    "bits": 2.5,
    "commit": "69c5031",
    "seconds": {32: 165, 64: 204, 128: 274},  # calibration windows: quantize seconds
    "ppl": {32: 88.02, 64: 87.31, 128: 85.40},  # calibration windows: perplexity
}
DEMO_CALIB_SAMPLES = 32


def demo_config(bits: float, samples: int) -> CMPQConfig:
    """The demo's CMPQ: the defaults with a shorter calibration and no model tuning, so
    it takes minutes (`cmpq quantize` tunes the tables at 3.5 bits or fewer)."""
    return CMPQConfig(bits=bits, calib_samples=samples, tune_model=0)


def demo_calibration_note(model: str, bits: float, samples: int) -> str:
    """What the demo's short calibration costs, as measured (when it was)."""
    default = CMPQConfig().calib_samples
    tuning = CMPQConfig(bits=bits).with_model_tuning(whole=True).tune_model
    note = (
        f"CMPQ calibrated on {samples} windows x 512 tokens, no model tuning (`cmpq quantize` "
        f"uses {default}" + (f" and {tuning} steps of model tuning" if tuning else "") + ")"
    )
    measured = DEMO_CALIBRATION
    known = (model, bits) == (measured["model"], measured["bits"])
    if not known or samples not in measured["ppl"] or default not in measured["ppl"]:
        return note + "."
    return (
        f"{note}: measured on {model} at {bits:g} bits, perplexity "
        f"{measured['ppl'][samples]:.2f} against {measured['ppl'][default]:.2f} with {default}, "
        f"quantized in {measured['seconds'][samples]:.0f} s instead of "
        f"{measured['seconds'][default]:.0f} s, both untuned (2 CPU cores, commit "
        f"{measured['commit']})."
    )


def _print_row(label: str, bits: float, stored_bytes: int, ppl: float) -> None:
    print(f"{label:<24}{bits:>12.2f}{stored_bytes / 1e6:>12.2f}{ppl:>12.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmpq", description="Channel-wise mixed-precision quantization of LLMs."
    )
    parser.add_argument("--version", action="version", version=f"cmpq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="perplexity of a model or a quantized output")
    evaluate.add_argument("model", help="alias, checkpoint dir, cmpq output dir, .gguf or hub id")
    _add_eval_options(evaluate)
    _add_backend_option(evaluate)
    evaluate.add_argument("--json", help="write the result as JSON to this file")
    evaluate.set_defaults(func=cmd_eval)

    quant = commands.add_parser("quantize", help="quantize a model and write it to --out")
    quant.add_argument("model", help="alias, checkpoint dir, .gguf or hub id")
    quant.add_argument(
        "--method",
        choices=list(CONFIGS),
        default="cmpq",
        help="cmpq (default) or rtn, the round-to-nearest baseline",
    )
    quant.add_argument(
        "--max-size",
        help="cmpq: instead of --bits, the most bytes model.safetensors may take, "
        "embeddings and lm_head included (60MB, 600MiB, 1.5GB, or a byte count)",
    )
    add_config_options(quant)
    quant.add_argument("--out", required=True, help="output directory")
    quant.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    quant.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last finished block "
        "(same model, options and --out)",
    )
    quant.add_argument(
        "--device",
        default="cpu",
        help="where calibration and quantization run: cpu (default), cuda, cuda:N or auto",
    )
    quant.add_argument(
        "--hidden-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the calibration hidden states held between blocks (float32: exact; "
        "bfloat16: half the memory)",
    )
    quant.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="threads",
        help="where the per-linear work runs: this machine's threads (default) or Ray tasks",
    )
    quant.add_argument(
        "--ray-address",
        help="with --executor ray: the cluster to join (auto, ray://HEAD:10001); "
        "default: start Ray on this machine",
    )
    quant.add_argument(
        "--max-shard-size",
        help="split the weights into shards of at most this size, with an index "
        "(2GB by default; 500MB, 1GiB, or a byte count)",
    )
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
    _add_backend_option(gen)
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
    demo.add_argument(
        "--calib-samples",
        type=int,
        default=DEMO_CALIB_SAMPLES,
        help=f"CMPQ calibration windows ({DEMO_CALIB_SAMPLES}, fewer than quantize's, for speed)",
    )
    _add_eval_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """cmpq's own warnings as one ``warning: ...`` line; others as Python prints them."""
    if issubclass(category, CmpqWarning):
        print(f"warning: {in_cli_words(str(message))}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        args.func(args)
    except CmpqError as exc:
        print(f"error: {in_cli_words(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
