"""What every `lm-worker` command shares: one-line errors, the retrieval option families, and the
retriever a command opens from them.

A command that retrieves takes one family of options per datastore it reads: `--target` or
`--datastore`, `-k`-like `--k`, `--nprobe` and `--rerank`, with a prefix (`--knnlm-`, `--retro-`)
where `eval` reads two. `retrieval_flags(args, family)` gathers a family into `RetrievalFlags`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROG = "lm-worker"
LM_KINDS = ("lm",)  # the checkpoint kinds a flag takes: the base LM (the LM chunk encoder)
KNNLM_KINDS = ("lm", "hf")  # models with kNN-LM keys: the base LM or a Hugging Face causal LM
RETRO_KINDS = ("retro",)
SHOWN_TEXT = 1 << 22  # characters of a model's text a command prints: more than any decode


def shown_text(text: str, limit: int = SHOWN_TEXT) -> str:
    """A model's text for the terminal: newlines kept, every other control character (a terminal escape
    among them) escaped, cut past `limit` characters."""
    from lm_worker.retrieval.errors import one_line  # the service's modules load only when a command needs them

    return one_line(text, limit, newlines=True)


def safe_text(value: object) -> str:
    """A value read from a file (a fingerprint in documents.json, source.json, a checkpoint), for a message:
    quoted, escaped and cut (`untrusted.safe_text`), so that it cannot forge a line."""
    from lm_worker.retrieval.errors import safe_text as quoted

    return quoted(value)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with no usage dump. `refuse`, when given, checks the
    parsed flags together: its ValueError is the parser's error (exit 2), as a single flag's is."""

    def __init__(self, *args, refuse: Callable[[argparse.Namespace], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refuse = refuse

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, then `refuse` on the result."""
        parsed, rest = super().parse_known_args(args, namespace)
        if self.refuse is not None:
            try:
                self.refuse(parsed)
            except ValueError as err:
                self.error(str(err))
        return parsed, rest

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class RetrievalFlags:
    """One family of retrieval options as given: where the neighbours come from and what to ask for."""

    family: str  # "" or a prefix such as "knnlm-"
    target: str | None
    datastore: Path | None
    k: int
    nprobe: int
    rerank: int

    def flag(self, name: str) -> str:
        """The option's name on the command line, e.g. --knnlm-target."""
        return f"--{self.family}{name}"


def add_retrieval_args(p: argparse.ArgumentParser, k: int, family: str = "", k_help: str = "neighbours per query"
                       ) -> None:
    """Adds a family of retrieval options (--target/--datastore, --k, --nprobe, --rerank) with `family` as prefix."""
    where = p.add_mutually_exclusive_group()
    where.add_argument(f"--{family}target", help="HOST:PORT of a router, or the shards' addresses comma-separated "
                                                 "(replicas of a shard '|'-separated): the command then fans out to "
                                                 "them itself, which costs less CPU per request than a router's hop "
                                                 "(benchmarks/cpu_cost.py); ray:NAME: a deployment on the connected "
                                                 "Ray cluster, through its router")
    where.add_argument(f"--{family}datastore", type=Path, help="serve this datastore locally while the command runs; "
                                                             "the command fans out to its shards itself")
    p.add_argument(f"--{family}k", type=int, default=k, help=k_help)
    p.add_argument(f"--{family}nprobe", type=int, default=0, help="inverted lists probed (0: the datastore's default)")
    p.add_argument(f"--{family}rerank", type=int, default=0, metavar="N",
                   help="re-rank N candidates by exact distance from the stored keys (0: off)")


def add_security_args(p: argparse.ArgumentParser) -> None:
    """TLS and the bearer token of the calls to the retrieval service (every --target of the command)."""
    g = p.add_argument_group("security of the calls to the retrieval service (every --*target)")
    g.add_argument("--tls-ca", type=Path, help="verify the servers with this CA (PEM): TLS on")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate, for servers that require one (PEM)")
    g.add_argument("--tls-key", type=Path, help="the private key of that certificate (PEM)")
    g.add_argument("--tls-server-name", help="the name the servers' certificates carry, when not the host dialled")
    g.add_argument("--auth-token-file", type=Path,
                   help="the bearer token to send (the file's first line); default: RETRIEVER_AUTH_TOKEN")
    g.add_argument("--allow-plaintext-token", action="store_true",
                   help="send the token without TLS to an address that is not loopback (refused otherwise: "
                        "anyone on the way could read it)")


def security_of(args: argparse.Namespace):
    """The `ClientSecurity` of a command's security flags."""
    from lm_worker.retrieval.service import ClientSecurity

    return ClientSecurity(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                          server_name=args.tls_server_name, token_file=args.auth_token_file,
                          plaintext_token=args.allow_plaintext_token)


def add_encoder_lm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-lm", type=Path,
                   help="a RETRO datastore encoded with the LM: its checkpoint, if not where the datastore says")


def ray_address_arg(text: str) -> str:
    """An argparse type for a Ray cluster's address: auto, host:port or ray://host:port (port in [1, 65535])."""
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if text != "auto" and not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"expected auto, host:port or ray://host:port with a port in [1, 65535], "
                                         f"got {text!r}")
    return text


def add_ray_address(p: argparse.ArgumentParser) -> None:
    """Adds --address, the Ray cluster a command runs on."""
    p.add_argument("--address", type=ray_address_arg,
                   help="Ray cluster to run on: this address (auto: the one `ray start` made on this machine), else "
                        "RAY_ADDRESS (as under `ray job submit`), else a new local cluster that ends with the "
                        "command; a cluster that does not answer fails within RETRIEVER_RAY_CONNECT_TIMEOUT seconds "
                        "(30)")


def retrieval_flags(args: argparse.Namespace, family: str = "") -> RetrievalFlags:
    """The options of one family, as parsed."""
    values = vars(args)
    dest = family.replace("-", "_")
    return RetrievalFlags(family, values[f"{dest}target"], values[f"{dest}datastore"], values[f"{dest}k"],
                          values[f"{dest}nprobe"], values[f"{dest}rerank"])


def retrieval_config(flags: RetrievalFlags, k: int | None = None):
    """The `RetrievalConfig` of a family (k overridden where the model fixes it)."""
    from lm_worker.retrieval.config import RetrievalConfig

    return RetrievalConfig(k=k or flags.k, nprobe=flags.nprobe, exact_rerank=flags.rerank > 0,
                           rerank_candidates=flags.rerank)


@contextlib.contextmanager
def open_target(flags: RetrievalFlags) -> Iterator[str | None]:
    """The retrieval target: the --target as given, or the shards of --datastore served locally
    meanwhile (every shard and a router as local processes), which the client fans out to itself;
    None when neither is given."""
    if flags.target:
        yield flags.target
    elif flags.datastore:
        from retriever_server.cluster.launcher import LocalDeployment

        with LocalDeployment.for_one_command(flags.datastore) as deployment:
            yield deployment.shards_target
    else:
        yield None


@contextlib.contextmanager
def open_retriever(flags: RetrievalFlags, k: int | None = None, security=None) -> Iterator:
    """A `ServiceRetriever` for the family's target (see `open_target`); None when none is given.
    `security` applies to a --target; a datastore served for the command is on loopback, in plaintext."""
    from lm_worker.retrieval.service import ClientSecurity, ServiceRetriever, resolve_target

    with open_target(flags) as target:
        if target is None:
            yield None
            return
        secure = security if flags.target and security is not None else ClientSecurity()
        with ServiceRetriever(resolve_target(target), retrieval_config(flags, k), secure) as retriever:
            yield retriever


def check_checkpoints(*checks: tuple[str, Path | None, tuple[str, ...]]) -> None:
    """Checks each (flag, checkpoint, kinds) given, before any work starts: a ValueError naming the flag,
    the path, the kind found and the kinds it takes when the checkpoint holds another model. A flag not
    given (None) is skipped.

    Example:
        >>> check_checkpoints(("--retro", args.retro, RETRO_KINDS), ("--encoder-lm", args.encoder_lm, LM_KINDS))
    """
    from lm_worker.models.checkpoint import require_kind

    for flag, path, kinds in checks:
        if path is not None:
            require_kind(path, kinds, flag)


def check_tokenizers(tokenizer, *checkpoints: tuple[str, Path | None]) -> None:
    """Checks each (flag, checkpoint) given, before any work: a ValueError naming the flag when the model
    was trained with another tokenizer than `tokenizer` (--data's), whose token ids mean other text."""
    from lm_worker.models.checkpoint import checkpoint_tokenizer

    for flag, path in checkpoints:
        made = checkpoint_tokenizer(path) if path is not None else ""
        if made and made != tokenizer.fingerprint:
            raise ValueError(f"{flag} {path} was trained with tokenizer {safe_text(made)}, but --data's is "
                             f"{tokenizer.fingerprint}: give the --data it was trained on")


def check_datastore_tokenizer(retriever, tokenizer, flags: RetrievalFlags) -> None:
    """A ValueError naming the family's flags when the datastore records another tokenizer than --data's
    (its payloads are token ids of that tokenizer)."""
    made = str((getattr(retriever, "metadata", None) or {}).get("tokenizer", ""))
    if made and made != tokenizer.fingerprint:
        raise ValueError(f"the datastore of {flags.flag('target')} / {flags.flag('datastore')} holds tokens of "
                         f"tokenizer {made[:80]!r}, but --data's is {tokenizer.fingerprint}")


def check_datastore_kind(flags: RetrievalFlags, kind: str, retriever=None) -> None:
    """A ValueError naming the family's flags when the datastore records (its manifest's kind) another kind
    than `kind` ("knnlm" or "retro"). Reads the retriever's metadata, or before any server starts, the
    manifest of --datastore (one that cannot be read is left to the server to report)."""
    if retriever is not None:
        metadata = getattr(retriever, "metadata", None) or {}
    else:
        try:
            metadata = json.loads((flags.datastore / "manifest.json").read_text()).get("metadata") or {}
        except (OSError, TypeError, ValueError, AttributeError):
            metadata = {}
    made = metadata.get("kind") if isinstance(metadata, dict) else None
    if made not in (None, kind):
        names = {"knnlm": "kNN-LM", "retro": "RETRO"}
        shown = repr(made[:40]) if isinstance(made, str) else type(made).__name__  # the server's words: bounded
        raise ValueError(f"the datastore of {flags.flag('target')} / {flags.flag('datastore')} is a {shown} "
                         f"datastore (its manifest's kind), not a {names.get(kind, kind)} one")


def need(value, flag: str, why: str):
    """`value`, or a ValueError saying that `flag` is required `why`."""
    if value is None:
        raise ValueError(f"{flag} is required {why}")
    return value


def need_retriever(retriever, flags: RetrievalFlags, why: str):
    """The retriever, or a ValueError naming the family's two options."""
    return need(retriever, f"{flags.flag('target')} or {flags.flag('datastore')}", why)


def check_flags(*checks: tuple[str, object, bool, str]) -> None:
    """Refuses the first (flag, value, ok, what) that is not ok: a ValueError `FLAG must be WHAT, got VALUE`.
    Checks a command's numbers before any work, and before a config would name its own field instead.

    Example:
        >>> check_flags(("--tokens", args.tokens, args.tokens >= 0, ">= 0"))
    """
    for flag, value, ok, what in checks:
        if not ok:
            raise ValueError(f"{flag} must be {what}, got {value}")


def refuse_given(flags: list[str], where: str) -> None:
    """Refuses flags given where they do nothing: a ValueError "FLAGS apply(ies) WHERE", where `where` says
    where they apply and what to do instead ("{them}" in it becomes "it" or "them"). None given: passes.

    Example:
        >>> refuse_given(["--stride"], "to `encode knnlm` only: leave {them} out")
    """
    if flags:
        one = len(flags) == 1
        names = flags[0] if one else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise ValueError(f"{names} {'applies' if one else 'apply'} {where.format(them='it' if one else 'them')}")


def search_checks(flags: RetrievalFlags, k: int) -> tuple[tuple[str, object, bool, str], ...]:
    """`check_flags` entries for a family's --nprobe and --rerank, where each request asks for k neighbours:
    the numbers the service would refuse, said as the command's flags before any work."""
    return ((flags.flag("nprobe"), flags.nprobe, flags.nprobe >= 0, ">= 0 (0: the datastore's default)"),
            (flags.flag("rerank"), flags.rerank, flags.rerank == 0 or flags.rerank >= k,
             f"0 (off) or at least the {k} neighbours asked for"))


def positive_finite(value: float) -> bool:
    """Whether a number is > 0 and finite (not inf or NaN): what a temperature must be."""
    return 0 < value < math.inf


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high] (None: no upper bound); argparse puts the flag before
    its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def positive_finite_arg(text: str) -> float:
    """An argparse type for a number > 0 and finite (not inf or NaN), such as a learning rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not positive_finite(value):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


@contextlib.contextmanager
def fields_as_flags(flags: dict[str, str]) -> Iterator[None]:
    """Within it, a ValueError from a config names the command's flags instead of the config's fields
    ({field: flag}), e.g. "top_p must be in (0, 1]" becomes "--top-p must be in (0, 1]"."""
    try:
        yield
    except ValueError as err:
        text = str(err)
        for field, flag in flags.items():
            text = re.sub(rf"(?<![\w/.-]){re.escape(field)}(?![\w/-])", flag, text)  # a word, not in a path
        raise ValueError(text) from None


def check_folder(path: Path | None, flag: str) -> None:
    """Refuses a folder to write that cannot be one, before the work whose result goes there: `path`, or
    the nearest of its parents that exists, is a file, or a folder this user cannot write in. A ValueError
    naming `flag` and the path; None (not given) passes."""
    if path is not None:
        _check_writable(path, (path, *path.parents), flag)


def check_file_to_write(path: Path, flag: str) -> None:
    """Refuses a file to write whose folder cannot hold it, before the work that makes it: the nearest
    existing folder above it is a file, or this user cannot write in it (a ValueError naming `flag`)."""
    _check_writable(path, path.parents, flag)


def _check_writable(path: Path, places, flag: str) -> None:
    """The first of `places` that exists must be a folder this user can write in (a ValueError naming `flag`
    and `path` otherwise)."""
    for place in places:
        if place.exists():
            if not place.is_dir():
                where = "exists and is not a folder" if place == path else f"lies under {place}, which is a file"
                raise ValueError(f"{flag} {path} {where}")
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: {'it' if place == path else place} is not writable by this user")
            return


def folder_kind(path: Path) -> str:
    """What an existing folder holds, by the file that marks it: "a datastore" (manifest.json), "a kNN-LM
    source" or "a RETRO source" (source.json), "a prepared corpus" (tokenizer.json), "a checkpoint folder"
    (checkpoint.pt), "a split of a prepared corpus" (documents.json); "" for an empty folder or one that is
    not there, "other files" otherwise."""
    if not path.is_dir() or not any(path.iterdir()):
        return ""
    if (path / "manifest.json").exists():
        return "a datastore"
    if (path / "source.json").exists():
        try:
            kind = json.loads((path / "source.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        kinds = {"knnlm": "a kNN-LM source", "retro": "a RETRO source"}
        return kinds.get(kind, "a datastore source") if isinstance(kind, str) else "a datastore source"
    marks = {"tokenizer.json": "a prepared corpus", "checkpoint.pt": "a checkpoint folder",
             "documents.json": "a split of a prepared corpus"}
    return next((kind for mark, kind in marks.items() if (path / mark).exists()), "other files")


def check_out_kind(path: Path, flag: str, takes: tuple[str, ...], what: str) -> None:
    """Refuses an existing folder to write that holds something else: a ValueError naming `flag` unless
    `folder_kind(path)` is empty or one of `takes`; `what` says what the command writes there."""
    kind = folder_kind(path)
    if kind and kind not in takes:
        held = "holds other files" if kind == "other files" else f"is {kind}"
        raise ValueError(f"{flag} {path} {held}, not {what}: give another folder")
