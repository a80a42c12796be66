"""The benchmarks' results helpers: the code version that names cached statistics."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results import code_version  # noqa: E402


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def test_code_version_follows_commits_and_refuses_uncommitted_edits(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "calib").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "calib" / "a.py").write_text("x = 1\n")
    (tmp_path / "other" / "b.py").write_text("y = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    first = code_version("calib", root=tmp_path)
    both = code_version("calib", "other", root=tmp_path)
    assert first is not None and len(first) == 10 and both not in (None, first)

    (tmp_path / "other" / "b.py").write_text("y = 2\n")  # outside the paths: no effect
    assert code_version("calib", root=tmp_path) == first
    assert code_version("calib", "other", root=tmp_path) is None

    (tmp_path / "calib" / "a.py").write_text("x = 2\n")
    assert code_version("calib", root=tmp_path) is None
    _git(tmp_path, "commit", "-qam", "two")
    second = code_version("calib", root=tmp_path)
    assert second is not None and second != first


def test_code_version_without_git_is_none(tmp_path):
    assert code_version("calib", root=tmp_path / "missing") is None
