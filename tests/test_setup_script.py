"""scripts/setup.sh, run against a stand-in `.venv/bin/python` that records each pip command: one FAISS
build at a time, nothing installed twice, and PyTorch's CPU index tried where pip finds no CPU torch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
here="$(dirname "$0")/.."
if [ "$1" = "-c" ] && [ -f "$here/old-python" ]; then
    exit 1
fi
if [[ "$*" == *"install -q -c constraints.txt"* ]] && [ -f "$here/conflict" ]; then
    cat "$here/conflict" >&2
    exit 1
fi
if [[ "$*" == *"-c constraints.txt"* ]] && [ -f "$here/no-cpu-torch" ] && [[ "$*" != *extra-index-url* ]]; then
    cat "$here/no-cpu-torch" >&2
    exit 1
fi
"""
DIRECT = "ERROR: No matching distribution found for torch==2.13.0+cpu\n"  # torch asked for directly
# torch through an extra: pip's resolver names neither torch nor a missing distribution
THROUGH_EXTRA = ("ERROR: Cannot install retrieval-datastore==0.1.0 because these package versions have conflicting "
                 "dependencies.\nERROR: ResolutionImpossible: for help visit https://pip.pypa.io/\n")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the set-up's inputs, with a stand-in virtual environment."""
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/setup.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(project: Path, extras: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls = project / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(project / "scripts" / "setup.sh"), extras], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "TORCH_INDEX_URL": "https://torch.example/cpu"})
    return done, calls.read_text().splitlines() if calls.exists() else []


def stamp_files(project: Path) -> str:
    return (project / ".venv" / "setup.stamp").read_text().splitlines()[0]


def stamp(project: Path) -> str:
    return (project / ".venv" / "setup.stamp").read_text().splitlines()[1]


def test_both_faiss_builds_at_once_are_refused(project):
    done, calls = setup(project, "cpu,gpu,lm")
    assert done.returncode == 2 and "give cpu or gpu, not both" in done.stderr and calls == []


def test_asking_for_the_other_faiss_build_swaps_it_and_keeps_the_other_extras(project):
    done, _ = setup(project, "cpu,lm")
    assert done.returncode == 0 and stamp(project) == "cpu,lm"
    done, calls = setup(project, "cpu")  # fewer extras than installed: nothing to do
    assert done.returncode == 0 and calls == []
    done, calls = setup(project, "gpu,dev")
    assert done.returncode == 0, done.stderr
    assert "-m pip uninstall -q -y faiss-cpu faiss-gpu" in calls  # both: they share the files of `faiss`
    assert calls[-1].endswith('-e .[lm,gpu,dev]') and stamp(project) == "lm,gpu,dev"
    done, calls = setup(project, "faiss,lm")  # the build there is: no swap back
    assert done.returncode == 0 and calls == []


def test_a_swap_whose_install_fails_is_done_again_by_the_next_run(project):
    assert setup(project, "cpu,lm")[0].returncode == 0
    (project / ".venv" / "no-cpu-torch").write_text(DIRECT)  # the install fails (even with PyTorch's index)
    (project / ".venv" / "bin" / "python").write_text(FAKE_PYTHON.replace("*extra-index-url*", "*never*"))
    done, _ = setup(project, "gpu,lm")
    assert done.returncode != 0 and not (project / ".venv" / "setup.stamp").exists()
    (project / ".venv" / "no-cpu-torch").unlink()
    done, calls = setup(project, "cpu,lm")  # FAISS was uninstalled: installed again, not "nothing to do"
    assert done.returncode == 0 and calls[-1].endswith("-e .[cpu,lm]")


def test_both_builds_left_by_an_older_set_up_are_installed_afresh_as_one(project):
    setup(project, "lm")
    (project / ".venv" / "setup.stamp").write_text(f"{stamp_files(project)}\ncpu,lm,gpu\n")
    done, calls = setup(project, "faiss,lm")
    assert done.returncode == 0, done.stderr
    assert "-m pip uninstall -q -y faiss-cpu faiss-gpu" in calls and calls[-1].endswith("-e .[lm,cpu]")


@pytest.mark.parametrize("said", [DIRECT, THROUGH_EXTRA], ids=["direct", "through-an-extra"])
def test_a_missing_cpu_torch_is_tried_again_with_pytorchs_cpu_index(project, said):
    (project / ".venv" / "no-cpu-torch").write_text(said)
    done, calls = setup(project, "cpu,lm")
    assert done.returncode == 0, done.stderr
    installs = [c for c in calls if " install " in f" {c} " and "--upgrade" not in c]
    assert len(installs) == 2 and installs[1].endswith("--extra-index-url https://torch.example/cpu")
    assert "trying again with https://torch.example/cpu" in done.stderr and stamp(project) == "cpu,lm"


def test_a_conflict_that_is_not_torch_is_shown_and_not_tried_again(project):
    """pip fetches the pinned torch by itself: the conflict is another, shown as pip gave it, no retry."""
    (project / ".venv" / "conflict").write_text(THROUGH_EXTRA.replace("retrieval-datastore", "protobuf"))
    done, calls = setup(project, "cpu,lm")
    assert done.returncode == 1 and "protobuf==0.1.0" in done.stderr and "trying again" not in done.stderr
    assert not any("extra-index-url" in c for c in calls)


def test_a_venv_of_an_old_python_or_without_pip_is_refused(project):
    (project / ".venv" / "old-python").write_text("")
    done, calls = setup(project, "cpu,lm")
    assert done.returncode == 1 and "remove it (rm -rf .venv)" in done.stderr
    assert not any(" install " in f" {c} " for c in calls)
