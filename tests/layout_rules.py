"""The house rules the layout test enforces, as functions over a source tree.

Each package's `__init__` docstring ends with an `Imports:` line (continued on indented lines): the
first-party modules and packages that its own modules may import, besides the package itself. A
module imports nothing first-party outside that list, imports no other module's private (`_name`)
objects, and the service side never imports the LM side or torch.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

FIRST_PARTY = ("retrieval", "retriever_server", "lm_worker")
NEVER = {"retriever_server": ("lm_worker", "torch", "transformers")}  # a shard container has no torch
MAX_LINES = 400
MAX_MODULES = 12


@dataclass(frozen=True)
class Import:
    module: Path
    line: int
    name: str  # dotted: the module, or module.name for `from module import name`
    private: bool


def package_of(path: Path, root: Path) -> str:
    """The dotted package whose rules govern the module at `path`."""
    return ".".join(path.parent.relative_to(root).parts)


def allowed_imports(package_dir: Path) -> tuple[str, ...]:
    """The names on the `Imports:` line of a package's `__init__` docstring ("" if there is none)."""
    doc = ast.get_docstring(ast.parse((package_dir / "__init__.py").read_text())) or ""
    match = re.search(r"^Imports:(.*(?:\n[ \t]+.*)*)", doc, re.M)
    if match is None:
        return ()
    return tuple(n for n in re.split(r"[\s,]+", match.group(1)) if n)


def imports_of(path: Path) -> list[Import]:
    """Every absolute import in a module, at any depth (imports inside functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            found += [Import(path, node.lineno, f"{node.module}.{a.name}", a.name.startswith("_") and
                             not a.name.startswith("__")) for a in node.names]
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, top: str) -> list[str]:
    """Every broken rule in package `top` under `root`, one line each."""
    problems = []
    modules = sorted((root / top).rglob("*.py"))
    for path in modules:
        where = f"{path.relative_to(root)}"
        package = package_of(path, root)
        allowed = (package, *allowed_imports(path.parent))
        for imp in imports_of(path):
            first_party = imp.name.split(".")[0] in FIRST_PARTY
            if imp.private and first_party:
                problems.append(f"{where}:{imp.line} imports a private name: {imp.name}")
            if first_party and not any(_within(imp.name, p) for p in allowed):
                problems.append(f"{where}:{imp.line} imports {imp.name}, which {package} may not import")
            if any(_within(imp.name, p) for p in NEVER.get(top, ())):
                problems.append(f"{where}:{imp.line} imports {imp.name}: {top} never does")
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{where} has {lines} lines (at most {MAX_LINES})")
    for package_dir in sorted({p.parent for p in modules}):
        count = len([p for p in package_dir.glob("*.py") if p.name not in ("__init__.py", "__main__.py")])
        if count > MAX_MODULES:
            problems.append(f"{package_dir.relative_to(root)} holds {count} modules (at most {MAX_MODULES})")
        if package_dir != root / top and not allowed_imports(package_dir):
            problems.append(f"{package_dir.relative_to(root)}/__init__.py has no Imports: line")
    return problems


def private_imports(paths: list[Path]) -> list[str]:
    """First-party private names imported by these files (tests, benchmarks)."""
    return [f"{i.module.name}:{i.line} imports a private name: {i.name}" for path in paths for i in imports_of(path)
            if i.private and i.name.split(".")[0] in FIRST_PARTY]


def gateway_apis(root: Path) -> tuple[str, ...]:
    """The service APIs the LM side may use outside its retrieval room: the backticked
    `retriever_server...` names in the list of `lm_worker/retrieval/__init__.py`'s docstring that
    follows the sentence ending "only these service APIs", up to the `Imports:` line."""
    doc = ast.get_docstring(ast.parse((root / "lm_worker" / "retrieval" / "__init__.py").read_text())) or ""
    _, _, listed = doc.partition("only these service APIs")
    listed = listed.partition("\nImports:")[0]
    return tuple(re.findall(r"`(retriever_server(?:\.\w+)+)`", listed))


def outside_gateway(root: Path) -> list[str]:
    """Imports of the service by lm_worker modules outside its retrieval room that the room's
    docstring does not list, one line each."""
    allowed = gateway_apis(root)
    problems = []
    for path in sorted((root / "lm_worker").rglob("*.py")):
        if path.parent == root / "lm_worker" / "retrieval":
            continue
        for imp in imports_of(path):
            if _within(imp.name, "retriever_server") and not any(_within(imp.name, a) for a in allowed):
                problems.append(f"{path.relative_to(root)}:{imp.line} imports {imp.name}, which only "
                                "lm_worker.retrieval may import")
    return problems
