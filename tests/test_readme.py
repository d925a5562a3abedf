"""The README's commands run as written in a fresh copy of the repository.

Every ```bash and ```python block of README.md runs in order, in one shell, in a copy of the files git
tracks (and the untracked ones it does not ignore): no `.venv`, no `runs/`, no caches of this
checkout. Two substitutions keep the test to a few minutes, and both are said here:

- the quick start's demo runs as `bash scripts/demo.sh --quick` (every stage at its smallest sizes),
  and the test command as `bash scripts/test.sh --collect-only -q` (it installs, lints and collects
  the suite, which cannot run inside itself);
- the copy's `.venv` is made beforehand, with this environment's installed packages on its path (a
  `.pth` file), so the scripts' `pip install` installs the project alone instead of downloading its
  dependencies again. CI's own run of `scripts/test.sh` in a fresh clone checks the full install.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
SUBSTITUTIONS = {"bash scripts/demo.sh ": "bash scripts/demo.sh --quick ",
                 "bash scripts/test.sh ": "bash scripts/test.sh --collect-only -q "}

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every bash and python block, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def as_script(blocks: list[tuple[str, str]]) -> str:
    """One bash script: bash blocks as written (with the substitutions above), python blocks through
    the environment's python."""
    lines = ["set -euo pipefail"]
    for language, code in blocks:
        if language == "bash":
            for old, new in SUBSTITUTIONS.items():
                code = code.replace(old, new)
            lines.append(code)
        else:
            lines.append(f"python - <<'README_PYTHON'\n{code}README_PYTHON")
    return "\n".join(lines) + "\n"


def copy_of_repository(target: Path) -> Path:
    """The files of a fresh clone of this working tree (tracked, or untracked and not ignored); the test
    is skipped where this tree is no git checkout (a source archive) or git is missing."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("the README's commands are run in a copy of a git checkout: this tree is none")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def provision_venv(repo: Path) -> None:
    """`repo/.venv` with this environment's packages on its path, so `pip install -e .` there finds
    every dependency installed and installs the project alone."""
    subprocess.run([sys.executable, "-m", "venv", str(repo / ".venv")], check=True, capture_output=True)
    site = next((repo / ".venv" / "lib").glob("python*/site-packages"))
    (site / "_readme_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_the_blocks_are_found_and_the_quick_start_is_two_commands():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    quick_start = [line for line in blocks[0][1].splitlines() if line.strip()]
    assert [shlex.split(line, comments=True) for line in quick_start] == [["bash", "scripts/demo.sh"],
                                                                        ["bash", "scripts/test.sh"]]
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    script = as_script(blocks)
    assert "bash scripts/demo.sh --quick" in script and "bash scripts/test.sh --collect-only -q" in script


def test_every_command_of_the_readme_runs_in_a_fresh_copy(tmp_path):
    repo = copy_of_repository(tmp_path / "repo")
    provision_venv(repo)
    (repo / "readme.sh").write_text(as_script(readme_blocks((repo / "README.md").read_text())))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    done = subprocess.run(["bash", "readme.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    assert "built ds: 20000 rows, 2 shards" in done.stdout
    shown = re.search(r"^```text\n(query 0:.*?)^```", (repo / "README.md").read_text(), re.S | re.M).group(1)
    assert shown in done.stdout, tail  # the neighbours the README shows are those its commands find
    assert "20000 (3, 5)" in done.stdout
    report = repo / "runs" / "demo-quick" / "report"
    for name in ("summary.md", "eval.json", "samples.md", "ppl_vs_lambda.png", "attention.png"):
        assert (report / name).stat().st_size > 0, name
    assert re.search(r"^\d+ tests? collected", done.stdout, re.M), tail
