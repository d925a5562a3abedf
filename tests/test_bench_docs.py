"""The benchmarks' docs say what the code does and cite the figures they show: benchmarks/README.md the
wheels the device scripts carry and where they install them, docs/results.md its CPU table's figures."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_section(readme: str) -> str:
    """The README's paragraph on `device_speed.sh --fetch`."""
    return readme.split("`--fetch` collects what that machine lacks", 1)[1].split("\n\n", 1)[0]


def test_the_readme_names_every_wheel_the_device_scripts_carry_and_where_they_go():
    wheels = re.search(r"^DEVICE_WHEELS=\((.*)\)", (ROOT / "benchmarks/device_wheels.sh").read_text(), re.M)
    section = " ".join(device_section((ROOT / "benchmarks/README.md").read_text()).split())
    for name in wheels.group(1).split():
        words = {"grpcio-health-checking": "health", "grpcio-reflection": "reflection"}.get(name, name)
        assert words in section, f"{name} is carried but not named"
    site = re.search(r"install_device_wheels \S+ (\S+)", (ROOT / "benchmarks/device_speed.sh").read_text()).group(1)
    assert f"--target {site}" in section and "PYTHONPATH" in section
    assert "venv over" not in section  # the wheels go into a folder on PYTHONPATH, not a venv


def cpu_section() -> str:
    """docs/results.md's "CPU per request" section, up to its figure's paragraph after the list."""
    text = (ROOT / "docs/results.md").read_text()
    return text.split("## CPU per request", 1)[1].split("\n## ", 1)[0]


def table_rows(section: str) -> dict[tuple[int, int, str], dict[str, float]]:
    """The section's first table, by (nq, k, path), each cell by column name."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    names = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
        rows[int(cells["nq"]), int(cells["k"]), cells["path"]] = {
            n: float(v) for n, v in cells.items() if n not in ("nq", "k", "path") and v}
    return rows


def test_the_cpu_texts_bounds_and_router_cpu_are_the_tables():
    """The text's "no service could pass sharded / (sharded + floor)" and the router's CPU are the
    figures of the table it calls "the run above", not of the run whose table that one replaced."""
    section = cpu_section()
    table = section.split("\n\n(CPU ms per request", 1)[0]
    rows = table_rows(table[table.index("| nq |"):])
    prose = " ".join(section.split())
    bounds = re.findall(r"(\d+\.\d+) / \((\d+\.\d+) \+ (\d+\.\d+)\) = (\d\.\d+) at nq=(\d+), k=(\d+)", prose)
    assert len(bounds) == 2, bounds
    for sharded, again, floor, bound, nq, k in bounds:
        row = rows[int(nq), int(k), "router"]
        assert float(sharded) == float(again) == row["in-process sharded"] and float(floor) == row["floor"]
        assert f"{row['in-process sharded'] / (row['in-process sharded'] + row['floor']):.2f}" == bound
    router = re.search(r"The router's own CPU at nq=(\d+), k=(\d+) \((\d+\.\d+) ms\)", prose)
    assert float(router.group(3)) == rows[int(router.group(1)), int(router.group(2)), "router"]["router"]
