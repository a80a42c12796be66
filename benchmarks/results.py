"""The one results writer every benchmark uses.

Every row records where it came from: the commit of the code (with ``-dirty``
when ``src/`` had uncommitted changes), the date, the machine (CPU model,
cores, torch threads, load average when it started) and the library versions;
the benchmark adds the full config. A results file is
``benchmarks/results/<stem>.{json,md,png}``: the JSON holds the command and
the rows, the markdown the command, where the rows come from, and the
benchmark's table. A file whose rows come from more than one commit says so
above its table, so a resumed run never mixes code silently.

The JSON is written through a temporary file and renamed, so two benchmark
processes sharing a results file (the peers runner) never read a torn file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
UNRECORDED = "unrecorded"  # rows measured before rows recorded their commit

# the suffix of the peers plan's default settings run without model tuning (issue 18):
# the levers tables' baseline
UNTUNED = " untuned"


def _git(*args: str, root: Path = ROOT) -> str:
    command = ["git", "-C", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def source_commit() -> str:
    """The commit the code under test came from (``-dirty`` with local edits in src/)."""
    try:
        dirty = _git("status", "--porcelain", "src")
        return _git("rev-parse", "--short=7", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return UNRECORDED


def code_version(*paths: str, root: Path = ROOT) -> str | None:
    """A short name for the committed state of ``paths`` (relative to the repository).

    It changes whenever a commit changes any file under them, so a cache named
    with it is never reused across code changes. ``None`` when the paths have
    uncommitted edits or git is unavailable: such results must not be cached.
    """
    try:
        if _git("status", "--porcelain", *paths, root=root):
            return None
        trees = [_git("rev-parse", f"HEAD:{path}", root=root) for path in paths]
    except (OSError, subprocess.CalledProcessError):
        return None
    if len(trees) == 1:
        return trees[0][:10]
    return hashlib.sha1(" ".join(trees).encode()).hexdigest()[:10]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def provenance() -> dict:
    """Where a row measured now comes from."""
    import torch

    return {
        "commit": source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_at_start": round(os.getloadavg()[0], 2),
        },
        "versions": {name: _version(name) for name in ("cmpq", "torch", "transformers")},
    }


@dataclass
class ChildRun:
    """A finished child process: its output, wall seconds and its own peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int


def run_child(argv: list[str], env: dict | None = None) -> ChildRun:
    """Run ``argv``; its peak RSS is that child's own (``wait4``), not the largest of
    every child so far as ``RUSAGE_CHILDREN`` reports."""
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(child.returncode, out.read(), err.read(), seconds, usage.ru_maxrss * 1024)


def commit_of(row: dict) -> str:
    return row.get("commit") or UNRECORDED


def replaced(rows: list[dict], setting: str, new: list[dict]) -> list[dict]:
    """``rows`` with ``setting``'s rows replaced by ``new`` (a re-run replaces its old
    rows only once the new ones are measured)."""
    return [row for row in rows if row["setting"] != setting] + new


def provenance_lines(rows: Iterable[dict]) -> list[str]:
    """What the markdown says above the table about where its rows come from."""
    rows = list(rows)
    commits = Counter(commit_of(row) for row in rows)
    machines = Counter(row["machine"]["cpu"] for row in rows if "machine" in row)
    machine = f" on {', '.join(machines)}" if machines else ""
    if set(commits) == {UNRECORDED}:
        return [f"Rows measured{machine} before rows recorded their commit, date and machine "
                "(the commit history dates them).", ""]  # fmt: skip
    if len(commits) == 1:
        return [f"All rows measured at commit {next(iter(commits))}{machine}; each row's date, "
                "threads, versions and config are in the JSON.", ""]  # fmt: skip
    listed = ", ".join(f"{commit} ({count} rows)" for commit, count in commits.most_common())
    return [
        f"**Rows from {len(commits)} commits**: {listed}{machine}. The `commit` column says "
        f"which code measured each row ({UNRECORDED}: measured before rows recorded it); "
        "dates, threads, versions and configs are in the JSON.",
        "",
    ]


@dataclass
class ResultsFile:
    """One benchmark's results: rows in memory, written as JSON, markdown and a plot."""

    stem: str
    command: str
    rows: list[dict] = field(default_factory=list)

    @property
    def json_path(self) -> Path:
        return RESULTS / f"{self.stem}.json"

    @classmethod
    def open(cls, stem: str, command: str | None, resume: bool = True) -> ResultsFile:
        """The results file ``stem``, with its saved rows when ``resume``; ``command``
        ``None`` keeps the saved command (a re-plot)."""
        results = cls(stem, command or "")
        saved = json.loads(results.json_path.read_text()) if results.json_path.is_file() else {}
        if resume:
            results.rows = saved.get("rows", [])
        if command is None:
            results.command = saved.get("command", "")
        return results

    def saved_rows(self) -> list[dict]:
        """The rows on disk now (another process may have added some)."""
        return ResultsFile.open(self.stem, self.command).rows

    @staticmethod
    def stamp(row: dict, config: dict | None = None) -> dict:
        """``row`` with its provenance (and ``config``) recorded."""
        return {**row, **provenance(), **({"config": config} if config is not None else {})}

    def write(
        self,
        table: list[str],
        plot: Callable[[Path], None] | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        """Write the JSON (atomically), the markdown (command, provenance, notes,
        ``table``) and, with ``plot``, the PNG."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"command": self.command, "rows": self.rows}, indent=2) + "\n"
        partial = self.json_path.with_suffix(f".json.{os.getpid()}.tmp")
        partial.write_text(payload)
        partial.replace(self.json_path)
        lines = [f"Command: `{self.command}`", "", *provenance_lines(self.rows), *notes]
        if notes:
            lines.append("")
        (RESULTS / f"{self.stem}.md").write_text("\n".join([*lines, *table]) + "\n")
        if plot is not None:
            plot(RESULTS / f"{self.stem}.png")
