"""What an unfinished build left in its work folder that a rerun may take up: the folder itself (made
with the same inputs and parameters), the trained codec (when it reads), and each finished shard
(when its files are the ones it recorded). Anything else is cleared and made again."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import faiss

from retriever_server.datastore.build_inputs import BuildConfig, BuildError, BuildInputs, file_stamp
from retriever_server.datastore.index import faiss_reason
from retriever_server.datastore.manifest import file_sha256
from retriever_server.datastore.row_parts import escaped

log = logging.getLogger(__name__)
MARKER = "build.json"  # the work folder's inputs and parameters
DONE = ".done.json"  # a finished shard's entry, in its folder
TRAINED = "trained.index"
STOP = "stop-"  # + a run's token: left in the work directory when a shard of that run fails, so that the
# run's other shard tasks end at their next block (a later run has a token of its own)


def is_leftover(name: str) -> bool:
    """Whether a name in a published datastore's folder is what its build leaves there until it tidies up:
    the marker, the codec, or a run's stop file (`STOP` and 12 hex digits)."""
    return name in (MARKER, TRAINED) or re.fullmatch(rf"{STOP}[0-9a-f]{{12}}", name) is not None


def fingerprint(config: BuildConfig, inputs: BuildInputs) -> dict:
    """What a resumed build must share with the one it resumes (the inputs' stamps as `check_inputs` took them)."""
    body = {k: v for k, v in asdict(config).items() if k not in ("overwrite", "out", "spill_rows")}
    return json.loads(json.dumps({**body, "factory": inputs.factory, "inputs": inputs.stamps}, default=str))


def read_json(path: Path):
    """A JSON file's contents, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return None


def prepare_workdir(config: BuildConfig, inputs: BuildInputs, work: Path) -> None:
    """Creates the work directory, or keeps an unfinished one made with the same inputs and parameters;
    BuildError, before either, when an input is not what `check_inputs` read (replaced since)."""
    _refuse_changed(inputs.stamps)
    made = fingerprint(config, inputs)
    marker = work / MARKER
    if work.exists() and read_json(marker) != made:
        log.warning("discarding %s: not an unfinished build of these inputs and parameters", work)
        shutil.rmtree(work)
    if work.exists():
        log.info("resuming the unfinished build at %s", work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(made, indent=2))


def check_inputs_unchanged(work: Path) -> None:
    """BuildError naming an input file whose size or modification time is not what `build.json` recorded when
    the build began: shards and codec read at other times may hold rows of two inputs (an encode replaced it)."""
    recorded = read_json(work / MARKER)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("inputs"), dict):
        raise BuildError(f"{work / MARKER} is gone or unreadable: cannot tell whether the inputs changed while the "
                         "build ran; nothing was published: run the build again")
    _refuse_changed(recorded["inputs"])


def _refuse_changed(stamps: dict) -> None:
    """BuildError naming the first input file whose stamp (`file_stamp`, by path) is not the one given."""
    for name, stamp in stamps.items():
        try:
            same = file_stamp(Path(name)) == stamp
        except OSError:
            same = False
        if not same:
            raise BuildError(f"{name} changed while the build ran (its size or modification time is not what it was "
                             "when the build began): nothing was published, as the shards may hold rows of both; "
                             "run the build again once the inputs are final")


def drop_codec(work: Path) -> None:
    """After training failed: removes the work folder, or, where a resumed build's shards are in it, only the
    codec (and its temporary file), so that the next run resumes them."""
    if not any(work.glob("shard-*")):
        shutil.rmtree(work, ignore_errors=True)  # it holds nothing worth resuming yet
        return
    for name in (TRAINED, f"{TRAINED}.tmp"):
        (work / name).unlink(missing_ok=True)


def reusable_codec(path: Path) -> bool:
    """Whether the trained codec an earlier run saved is there and reads; one cut short (a crash while it
    was written) is removed, to be trained again."""
    if not path.is_file():
        return False
    try:
        faiss.read_index(str(path))
    except RuntimeError as err:
        log.warning("training the codec again: %s does not read (%s)", escaped(path), faiss_reason(err))
        path.unlink()
        return False
    log.info("reusing the trained codec at %s", path)
    return True


def intact(shard_dir: Path, entry, start: int, end: int) -> bool:
    """Whether a finished shard covers [start, end) and its files have the sizes and sha256 it recorded."""
    try:
        return (entry["id_start"], entry["id_end"]) == (start, end) and all(
            (shard_dir / name).is_file() and (shard_dir / name).stat().st_size == f["bytes"]
            and file_sha256(shard_dir / name) == f["sha256"] for name, f in entry["files"].items()
        )
    except (KeyError, TypeError, AttributeError):
        return False


def reusable_shard(shard_dir: Path, start: int, end: int, codec: str, retrained: bool) -> dict | None:
    """The entry of a shard an earlier run finished with the codec whose sha256 is `codec`, or None (after
    clearing what is left of it). An entry that names no codec (an earlier version's) was built with the
    codec saved beside it: it is reused unless this run `retrained` the codec."""
    if not shard_dir.exists():
        return None
    entry = read_json(shard_dir / DONE)
    named = entry.get("codec", None if retrained else codec) if isinstance(entry, dict) else codec
    other = named != codec  # trained again since (on a GPU: not alike)
    if not other and intact(shard_dir, entry, start, end):
        log.info("reusing %s from the earlier run", shard_dir.name)
        return entry
    log.warning("%s from the earlier run %s; building it again", shard_dir.name,
                "was built with another codec" if other else "is unfinished or damaged")
    shutil.rmtree(shard_dir)
    return None
