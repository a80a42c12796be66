"""Byte fingerprints of quantized outputs: does this commit write what earlier ones did?

    python benchmarks/fingerprint_bench.py [--real]

Quantizes the tests' tiny random-weight models (Llama, Gemma3, OPT, GPT-2) with
five configs (the defaults at 3.3 bits, the paper's method at 2.5, per-row
tables at 3.0, global rd at 3.0, RTN 3-bit g32), and with ``--real``
``smollm2-135m`` at 3.0 bits with the defaults on 8 x 256 calibration tokens;
saves each with ``cmpq.save_quantized`` and records the sha256 of its
``model.safetensors``. Rows accumulate in benchmarks/results/fingerprint.json,
one set per commit; the table puts the commits side by side, so a change that
moves any stored byte shows, and one that should not (a refactor) can be seen
not to. Same machine, same torch: across CPUs or BLAS builds floats may differ.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from results import ROOT, ResultsFile, commit_of

sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny models

import cmpq  # noqa: E402
from cmpq.config import PAPER_METHOD  # noqa: E402

from tiny import make_tiny_model, make_tiny_tokenizer, tiny_batch  # noqa: E402

ARCHITECTURES = ("llama", "gemma3", "opt", "gpt2")
CASES = {
    "default": cmpq.CMPQConfig(bits=3.3, kmeans_iters=5),
    "paper": cmpq.CMPQConfig(bits=2.5, kmeans_iters=5, **PAPER_METHOD),
    "row": cmpq.CMPQConfig(bits=3.0, kmeans_iters=5, layout="row", **PAPER_METHOD),
    "rd": cmpq.CMPQConfig(bits=3.0, kmeans_iters=5, allocation="rd"),
    "rtn": cmpq.RTNConfig(bits=3, group_size=32),
}
REAL = cmpq.CMPQConfig(bits=3.0, calib_samples=8, calib_seqlen=256)


def fingerprint(model, tokenizer, report) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        out = cmpq.save_quantized(model, tokenizer, report, Path(scratch) / "q")
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]


def measure(real: bool) -> list[dict]:
    rows = []
    tokenizer = make_tiny_tokenizer()
    for arch in ARCHITECTURES:
        for name, config in CASES.items():
            model = make_tiny_model(arch)
            report = cmpq.quantize(model, config, calibration=tiny_batch(4, 24), progress=False)
            case = {"case": f"{arch}-{name}", "sha256": fingerprint(model, tokenizer, report)}
            rows.append(ResultsFile.stamp(case, config.as_dict()))
    if real:
        model, tokenizer = cmpq.load_model("smollm2-135m")
        report = cmpq.quantize(model, REAL, tokenizer=tokenizer, progress=False)
        case = {"case": "smollm2-135m-3.0-8x256", "sha256": fingerprint(model, tokenizer, report)}
        rows.append(ResultsFile.stamp(case, REAL.as_dict()))
    return rows


def table(rows: list[dict]) -> list[str]:
    commits = list(dict.fromkeys(commit_of(row) for row in rows))
    found = {(row["case"], commit_of(row)): row["sha256"] for row in rows}
    cases = list(dict.fromkeys(row["case"] for row in rows))
    lines = [
        "sha256 (first 16 hex digits) of each output's model.safetensors, by commit; "
        "`same` when equal to the commit on its left.",
        "",
        "| case | " + " | ".join(commits) + " |",
        "|---|" + "---|" * len(commits),
    ]
    for case in cases:
        cells, previous = [], None
        for commit in commits:
            value = found.get((case, commit))
            cells.append("—" if value is None else "same" if value == previous else value)
            previous = value if value is not None else previous
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="also smollm2-135m (about 3 min)")
    args = parser.parse_args()
    command = "python benchmarks/fingerprint_bench.py --real"
    results = ResultsFile.open("fingerprint", command)
    new = measure(args.real)
    now = {commit_of(row) for row in new}
    results.rows = [row for row in results.rows if commit_of(row) not in now] + new
    results.write(table(results.rows))
    print("\n".join(table(results.rows)))


if __name__ == "__main__":
    main()
