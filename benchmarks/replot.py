"""The command line of a benchmark's figure drawn again from its saved JSON (`cpu_cost_plot.py`,
`decoding_plot.py`): `python benchmarks/X_plot.py OUT/X.json` writes OUT/X.png."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def replot(argv: list[str] | None, script: str, description: str, key: str, draw: Callable[[object, Path], None]
           ) -> None:
    """Reads `key` of the JSON file named on the command line and has `draw(data, png)` write the figure
    beside it; a file that does not hold `key`, or not what the figure needs, ends the script with a
    message, not a traceback."""
    parser = argparse.ArgumentParser(prog=script, description=description)
    parser.add_argument("results", type=Path, help="the JSON file the benchmark wrote")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(f"{script}: cannot read the {key} of {args.results}: {err}")
    out = args.results.with_suffix(".png")
    try:
        draw(data, out)
    except (KeyError, TypeError, ValueError) as err:
        sys.exit(f"{script}: {args.results} does not hold what the figure needs: {err!r}")
    print(f"wrote {out}")
