"""The pipeline's stage clock: each stage's wall time, and whether it found its output already there."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lm_worker.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage as it runs: `reused` may be set by the stage itself once it knows (an evaluation whose
    every share was checkpointed by an earlier run)."""

    name: str
    reused: bool


class Stages:
    """Wall time of each stage, and whether it found its output already there."""

    def __init__(self):
        self.rows: list[tuple[str, float, bool]] = []

    @contextlib.contextmanager
    def stage(self, name: str, reused: bool) -> Iterator[Stage]:
        # "found": the stage may still find its output stale and run (the stage table says what it did)
        log.info("%s: %s", name, "output found from an earlier run" if reused else "running")
        started = time.perf_counter()
        record = Stage(name, reused)
        yield record
        self.rows.append((name, time.perf_counter() - started, record.reused))

    def table(self) -> str:
        lines = ["| stage | seconds | |", "|---|---:|---|"]
        lines += [f"| {name} | {s:.1f} | {'reused' if reused else ''} |" for name, s, reused in self.rows]
        lines.append(f"| total | {sum(s for _, s, _ in self.rows):.1f} | |")
        return "\n".join(lines) + "\n"


def done(path: Path) -> bool:
    return path.exists()


def connect_ray(config: PipelineConfig) -> None:
    from retriever_server.cluster.connect import connect

    connect(config.address, config.num_cpus or max(4, os.cpu_count() or 1), log_to_driver=False)

