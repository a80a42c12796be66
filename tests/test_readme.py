"""The README's numbers come from committed results: its generated blocks are what
benchmarks/readme_tables.py writes from the JSON, and every other measured number
in it appears in a results file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402

# a measured number: two or more decimals (84.89, 0.016), or thousands separators (84,986,564);
# not a requirement ("Python ≥ 3.10")
MEASURED = re.compile(r"(?<![\w.])(?<!≥ )(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d{2,})")


def _numbers_in_json(value, found: set[str]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        for digits in (0, 1, 2, 3):
            found.add(f"{value:.{digits}f}")
            found.add(f"{value:,.{digits}f}")
    elif isinstance(value, dict):
        for item in value.values():
            _numbers_in_json(item, found)
    elif isinstance(value, list):
        for item in value:
            _numbers_in_json(item, found)


def results_corpus() -> tuple[str, set[str]]:
    text = "\n".join(p.read_text() for p in RESULTS.glob("*") if p.suffix in (".md", ".txt"))
    numbers: set[str] = set()
    for path in RESULTS.glob("*.json"):
        _numbers_in_json(json.loads(path.read_text()), numbers)
    return text, numbers


def test_generated_blocks_are_what_the_results_say():
    readme = (ROOT / "README.md").read_text()
    assert readme_tables.BLOCK.search(readme), "the README has no generated blocks"
    assert readme_tables.render(readme) == readme, "run python benchmarks/readme_tables.py"


def test_every_other_measured_number_is_in_a_results_file():
    readme = (ROOT / "README.md").read_text()
    prose = readme_tables.BLOCK.sub("", readme)
    text, numbers = results_corpus()
    missing = [n for n in MEASURED.findall(prose) if n not in text and n not in numbers]
    assert not missing, f"README numbers in no results file: {missing}"


def test_the_number_check_can_fail():
    text, numbers = results_corpus()
    assert "84,986,564" in text  # a number the README quotes is found ...
    assert "123.4567" not in text and "123.4567" not in numbers  # ... and a made-up one is not
    assert MEASURED.findall("ppl 84.89 at 2.5 bits, 84,986,564 bytes") == ["84.89", "84,986,564"]
