"""The house rules: rooms import only what their `__init__` docstrings allow, the LM side reaches the
service only through its retrieval room, no private names cross modules, and no module or package
outgrows its limit. Each rule is also shown to fail on a planted violation."""

from pathlib import Path

import pytest
from layout_rules import MAX_LINES, MAX_MODULES, gateway_apis, outside_gateway, private_imports, violations

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("top", ["retriever_server", "lm_worker"])
def test_the_source_tree_keeps_the_house_rules(top):
    assert violations(ROOT, top) == []


def test_tests_and_benchmarks_import_no_private_names():
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert private_imports(files) == []


def test_the_lm_side_reaches_the_service_through_its_retrieval_room_only():
    """Outside `lm_worker/retrieval`, the LM side imports only the service APIs that the room's
    docstring lists (build, row parts, launcher, Ray serving, joining Ray), and never its serving
    or wire modules, whatever the rooms' own Imports: lines say."""
    listed = gateway_apis(ROOT)
    assert "retriever_server.datastore.build" in listed and "retriever_server.cluster.launcher" in listed
    assert not any(a.startswith(("retriever_server.serving", "retriever_server.wire", "retriever_server.client"))
                   for a in listed)
    assert outside_gateway(ROOT) == []


def _package(root: Path, dotted: str, doc: str) -> Path:
    folder = root.joinpath(*dotted.split("."))
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f'"""{doc}"""\n')
    return folder


def test_a_planted_violation_of_each_rule_is_reported(tmp_path):
    _package(tmp_path, "lm_worker", "The LM side.\n\nImports: lm_worker.retrieval")
    decoding = _package(tmp_path, "lm_worker.decoding", "Decoding.\n\nImports: lm_worker.models,\n    lm_worker.data")
    _package(tmp_path, "lm_worker.retrieval", "Retrieval.\n\nImports: retriever_server.client")
    bare = _package(tmp_path, "lm_worker.bare", "No rules line.")
    (decoding / "ok.py").write_text("from lm_worker.models.lm import LM\nimport lm_worker.data.tokens\n"
                                    "from lm_worker.decoding.steps import Step\nimport numpy\n")
    (decoding / "stub.py").write_text("def f():\n    from retriever_server.serving.client import RetrieverClient\n")
    (decoding / "private.py").write_text("from lm_worker.models.lm import _cache\n")
    (decoding / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    for i in range(MAX_MODULES):
        (bare / f"m{i}.py").write_text("")
    assert sorted(violations(tmp_path, "lm_worker")) == sorted([
        f"lm_worker/decoding/long.py has {MAX_LINES + 1} lines (at most {MAX_LINES})",
        "lm_worker/decoding/private.py:1 imports a private name: lm_worker.models.lm._cache",
        "lm_worker/decoding/stub.py:2 imports retriever_server.serving.client.RetrieverClient, which "
        "lm_worker.decoding may not import",
        "lm_worker/bare/__init__.py has no Imports: line",
    ])
    (bare / "m12.py").write_text("")
    assert f"lm_worker/bare holds {MAX_MODULES + 1} modules (at most {MAX_MODULES})" in violations(tmp_path,
                                                                                                   "lm_worker")


def test_the_service_side_never_imports_torch(tmp_path):
    _package(tmp_path, "retriever_server", "Service.\n\nImports: retrieval")
    (tmp_path / "retriever_server" / "x.py").write_text("import torch\n")
    assert violations(tmp_path, "retriever_server") == ["retriever_server/x.py:1 imports torch: retriever_server never "
                                                        "does"]


def test_a_planted_import_past_the_gateway_is_reported(tmp_path):
    _package(tmp_path, "lm_worker", "The LM side.")
    _package(tmp_path, "lm_worker.retrieval", "Retrieval.\n\nOutside this room, the LM side may use only these "
             "service APIs:\n\n- `retriever_server.datastore.build`\n\nImports: retriever_server")
    jobs = _package(tmp_path, "lm_worker.jobs", "Jobs.\n\nImports: retriever_server")
    (tmp_path / "lm_worker" / "retrieval" / "client.py").write_text("from retriever_server.serving import shard\n")
    (jobs / "ok.py").write_text("from retriever_server.datastore.build import build_datastore\n")
    (jobs / "bad.py").write_text("from retriever_server.serving.merge import merge_results\n")
    assert gateway_apis(tmp_path) == ("retriever_server.datastore.build",)
    assert outside_gateway(tmp_path) == ["lm_worker/jobs/bad.py:1 imports retriever_server.serving.merge."
                                         "merge_results, which only lm_worker.retrieval may import"]


# Standard-library names newer than pyproject's requires-python (3.10), with the version that added them.
NEWER_STDLIB = {"hashlib.file_digest": "3.11", "asyncio.TaskGroup": "3.11", "asyncio.timeout": "3.11",
                "asyncio.Runner": "3.11", "contextlib.chdir": "3.11", "datetime.UTC": "3.11", "enum.StrEnum": "3.11",
                "typing.Self": "3.11", "typing.Never": "3.11", "typing.assert_never": "3.11", "tomllib": "3.11",
                "itertools.batched": "3.12", "ExceptionGroup": "3.11", "BaseExceptionGroup": "3.11"}


def newer_stdlib_uses(files: list[Path]) -> list[str]:
    """FILE:LINE name (version) for each use of a NEWER_STDLIB name: as an attribute, import or bare name."""
    import ast

    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Name):
                names = [node.id]
            found += [f"{path.name}:{node.lineno} {n} ({NEWER_STDLIB[n]})" for n in names if n in NEWER_STDLIB]
    return found


def test_the_code_runs_on_the_oldest_python_it_claims(tmp_path):
    """pyproject says Python 3.10: no module uses a standard-library name that came later (`hashlib.file_digest`
    did, and every distributed evaluation failed on 3.10)."""
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()
    tops = ("retriever_server", "lm_worker", "benchmarks", "scripts")
    files = [p for top in tops for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 100 and newer_stdlib_uses(files) == []
    planted = tmp_path / "planted.py"
    planted.write_text("import hashlib\nimport tomllib\nfrom typing import Self\nhashlib.file_digest(f, 'sha256')\n")
    assert newer_stdlib_uses([planted]) == ["planted.py:2 tomllib (3.11)", "planted.py:3 typing.Self (3.11)",
                                            "planted.py:4 hashlib.file_digest (3.11)"]
