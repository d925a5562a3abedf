"""The shares of a distributed evaluation, and the folder that keeps the finished ones.

A share is `batches_per_share` consecutive batches of the evaluation, fixed by the data and the config
alone. Each finished share is written to `CHECKPOINT/share-00012.json` (atomically) with the batches it
covers and what it was computed with: the model's fingerprint, the datastore's version and the token
store's fingerprint (`identity`). A rerun reuses a saved share only when all of these are still the
same, so a retrained model or a rebuilt datastore at the same paths is evaluated again, not mixed in.
A kNN-LM share's result carries its searched positions' own sums (`searched_nll`); one saved without
them that followed pointers and holds an inf sum is evaluated again too (elsewhere they are recovered).

Checking saved shares needs the datastore's version, so a rerun asks the service for it (one GetInfo),
even when every share is saved already; it starts workers only for the shares left to compute.

Example:
    >>> saved = open_saved(job.describe(), Path("run/eval/shares"))
    >>> done = current(planned(saved, plan_shares(n_batches, 4)), identity_of(model, version, store))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_worker.data.token_store import write_text_atomically
from lm_worker.models.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

JOB_JSON = "job.json"
PATH_FIELDS = ("checkpoint", "store", "tokenizer", "encoder_lm")  # files a job names; shares identify their contents


@dataclass(frozen=True)
class Share:
    """One unit of work: batches [start, stop) of the evaluation."""

    index: int
    start: int
    stop: int


def plan_shares(n_batches: int, batches_per_share: int) -> list[Share]:
    """Consecutive shares of `batches_per_share` batches covering [0, n_batches)."""
    return [Share(i, s, min(s + batches_per_share, n_batches))
            for i, s in enumerate(range(0, n_batches, batches_per_share))]


def store_fingerprint(directory: Path) -> str:
    """A hash of a token store's document list and its tokens: which text a share scored."""
    h = hashlib.sha256()
    for name in ("documents.json", "tokens.npy"):  # doc_ids.npy follows from the documents' spans
        part = hashlib.sha256()  # read in blocks (hashlib.file_digest is Python 3.11+)
        with open(Path(directory) / name, "rb") as f:
            while block := f.read(1 << 22):
                part.update(block)
        h.update(part.digest())
    return "store:" + h.hexdigest()[:16]


def identity_of(model: torch.nn.Module, datastore_version: str, store: Path) -> dict[str, str]:
    """What a share is computed with: the model's weights, the datastore's version, the token store."""
    return {"model": model_fingerprint(model), "datastore_version": datastore_version,
            "store": store_fingerprint(store)}


def holds_another_job(description: dict, directory: Path) -> bool:
    """Whether `directory` holds the shares of another job than `description` (`EvalJob.describe()`)."""
    marker = directory / JOB_JSON
    if not marker.exists():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{marker} cannot be read ({err}): remove {directory} or choose another checkpoint "
                         "folder") from None
    return _within(saved, description) != description


def _within(saved, description):
    """`saved` without the keys that `description` (at the same place) does not hold: what an older marker
    recorded and the job no longer counts (its paths, how long a search may take, kNN-LM settings of a
    RETRO evaluation)."""
    if not isinstance(saved, dict) or not isinstance(description, dict):
        return saved
    return {k: _within(v, description[k]) for k, v in saved.items() if k in description}


def refuse_another_job(description: dict, directory: Path) -> None:
    """ValueError if `directory` holds the shares of another job than `description` (`EvalJob.describe()`);
    reads, never writes: a check before any work."""
    if holds_another_job(description, directory):
        raise ValueError(f"{directory} holds the shares of a different evaluation ({directory / JOB_JSON} differs): "
                         "remove it or choose another checkpoint folder")


def open_saved(description: dict, directory: Path | None) -> dict[int, dict]:
    """Finished shares from an earlier run of the job `description` (its `EvalJob.describe()`);
    ValueError if the folder holds another job's."""
    if directory is None:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / JOB_JSON
    if marker.exists():
        refuse_another_job(description, directory)
    else:
        write_text_atomically(marker, json.dumps(description, indent=2))
    done = {}
    for path in sorted(directory.glob("share-*.json")):
        try:
            body = json.loads(path.read_text())
            done[int(body["share"])] = body
        except (OSError, ValueError, KeyError, TypeError) as err:  # cut short by a crash: computed again
            log.warning("%s cannot be read (%s): its share is computed again", path, err)
    return done


def planned(done: dict[int, dict], shares: list[Share]) -> dict[int, dict]:
    """The finished shares that cover the batches the plan gives them: a share saved with another share
    size (or before shares recorded their batches) is computed again, not added in for other batches."""
    kept = {i: body for i, body in done.items()
            if i < len(shares) and (body.get("start"), body.get("stop")) == (shares[i].start, shares[i].stop)}
    if len(kept) < len(done):
        log.warning("%d saved shares cover other batches than this run's shares (another share size): computing "
                    "them again", len(done) - len(kept))
    return kept


def current(done: dict[int, dict], identity: dict[str, str]) -> dict[int, dict]:
    """The finished shares computed with `identity` (model, datastore version, token store): a share
    from other weights or another datastore at the same paths is computed again, and so is a kNN-LM
    share that followed pointers, saved before shares kept the searched positions' own sums, whose sums
    at some λ are inf (`_lacks_searched_sums`)."""
    lacking = {i for i, body in done.items() if _lacks_searched_sums(body)}
    if lacking:
        log.warning("%d saved kNN-LM shares followed pointers but were saved before shares kept the searched "
                    "positions' own sums: computing them again", len(lacking))
        done = {i: body for i, body in done.items() if i not in lacking}
    kept = {i: body for i, body in done.items() if body.get("identity") == identity}
    unrecorded = sum("identity" not in body for body in done.values())
    if unrecorded:
        log.warning("%d saved shares were saved before shares recorded their model, datastore and token store: "
                    "computing them again", unrecorded)
    if len(kept) + unrecorded < len(done):
        now = ", ".join(f"{name} {value}" for name, value in identity.items())
        log.warning("%d saved shares were computed with another model, datastore or token store than this run's "
                    "(%s): computing them again", len(done) - len(kept) - unrecorded, now)
    return kept


def _lacks_searched_sums(body: dict) -> bool:
    """Whether `body` is a kNN-LM share (its result has `followed_nll`) that followed pointers (fewer positions
    searched than scored) with no `searched_nll`, and a sum at some λ is inf: every position's sum less the
    followed ones' is then no sum of the searched positions, which cannot be recovered. Where every sum is
    finite the difference is theirs (up to rounding), and where none was followed every position's is."""
    result = body.get("result")
    if not (isinstance(result, dict) and "followed_nll" in result and "searched_nll" not in result
            and result.get("searched", 0) < result.get("tokens", 0)):
        return False
    sums = [*dict(result.get("nll") or {}).values(), *dict(result["followed_nll"] or {}).values()]
    return not all(math.isfinite(float(v)) for v in sums)


def save_share(directory: Path | None, body: dict) -> None:
    """Writes a finished share's record into `directory` (atomically; None: nowhere)."""
    if directory is None:
        return
    write_text_atomically(directory / f"share-{body['share']:05d}.json", json.dumps(body))
