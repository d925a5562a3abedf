"""The docs stay true to the code: the CLI reference holds every command and option the parsers
accept, and no doc names a module that does not exist."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        ROOT / "deploy" / "README.md"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings]


@pytest.mark.parametrize("prog", ["retriever-server", "lm-worker"])
def test_the_cli_reference_holds_every_command_and_option(prog):
    from lm_worker.cli import build_parser as lm_parser
    from retriever_server.cli import build_parser as server_parser

    parser = {"retriever-server": server_parser, "lm-worker": lm_parser}[prog]()
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^### `(\S+ \S+)`\n(.*?)(?=^### |\Z)", text, re.S | re.M))
    for name, command in subcommands(parser).items():
        section = sections.get(f"{prog} {name}")
        assert section is not None, f"docs/cli.md has no section for {prog} {name}: run scripts/gen_cli_docs.py"
        missing = [o for o in options(command) if o not in section]
        assert not missing, f"{prog} {name}: {missing} missing from docs/cli.md: run scripts/gen_cli_docs.py"


def test_the_cli_reference_is_current_on_this_python():
    """Exactly as the generator writes it (argparse's layout differs between Python versions, so the
    test above is the one that holds everywhere)."""
    done = subprocess.run([sys.executable, "scripts/gen_cli_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode and sys.version_info[:2] != (3, 11):
        pytest.skip("docs/cli.md is generated on Python 3.11")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_a_doc_names_exists(doc):
    text = doc.read_text()
    paths = set(re.findall(r"\b((?:retriever_server|lm_worker|benchmarks|scripts|tests)/[\w/]+\.py)\b", text))
    dotted = set(re.findall(r"\b((?:retriever_server|lm_worker)(?:\.[a-z_]+)+)\b", text))
    missing = [p for p in paths if not (ROOT / p).is_file()]
    for name in dotted:
        parts = name.split(".")
        # the longest prefix that is a module or package must exist; what follows may be a name in it
        found = any((ROOT.joinpath(*parts[:i]).with_suffix(".py")).is_file() or
                    (ROOT.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts), 1, -1))
        if not found:
            missing.append(name)
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {sorted(missing)}"


def test_no_doc_sends_the_reader_to_a_machine_path():
    for doc in DOCS:
        assert not re.search(r"/work/|/root/|/home/\w+", doc.read_text()), doc
