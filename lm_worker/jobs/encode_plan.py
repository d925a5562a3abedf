"""What the encode job encodes and how its rows are cut into parts: the config, its checks, the plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lm_worker.encoders.registry import ENCODERS
from lm_worker.sources.knnlm import knn_windows
from lm_worker.sources.output import PARTS
from lm_worker.sources.source import PAYLOAD_FILES

PART_JSON = "part.json"


DEFAULT_ROWS_PER_PART = {"knnlm": 65536, "retro": 4096}


DEFAULT_BATCH = {"knnlm": 16, "retro": 1024}  # windows / chunks per forward, as the in-process loop


class EncodeError(RuntimeError):
    """A part could not be encoded, or the parts on disk disagree; the message says which and why."""


@dataclass(frozen=True)
class EncodeJobConfig:
    """What the encode job encodes, and on how many actors.

    Attributes:
        kind: "knnlm" (keys of an LM at every position) or "retro" (chunk embeddings).
        data: a prepared corpus (`lm-worker prepare`): tokenizer.json and one folder per split.
        split: the split to encode.
        checkpoint: the base LM (a checkpoint file or folder; kNN-LM: or a Hugging Face folder); for
            RETRO only with encoder "lm".
        encoder: RETRO: the frozen chunk encoder, "minilm" or "lm" (see `lm_worker.encoders.registry`).
        chunk_len: RETRO: tokens per chunk.
        context_len, stride: kNN-LM: the sliding windows (see `knn_windows`).
        rows_per_part: rows per part; 0: 65536 (kNN-LM) or 4096 (RETRO). kNN-LM parts hold whole
            batches of `batch` windows, so this is rounded up to a multiple of batch x stride rows (at
            least that many: 2048 with the defaults and a stride of 128); source.json records the most
            rows a part holds.
        workers: actors in the pool, each holding the model.
        batch_size: windows (kNN-LM) or chunks (RETRO) per forward; 0: 16 or 1024.
        device: "cpu" or "cuda" (each actor then gets `num_gpus` of a GPU).
        num_gpus: GPUs per actor; None: 1 on "cuda", 0 on "cpu".
        num_cpus: CPUs per actor.
        threads: torch threads per actor; 0: num_cpus (at least 1).
        address: the Ray cluster; None joins RAY_ADDRESS when set (as under `ray job submit`),
            else starts a local cluster.
        progress: show a progress bar over parts.
    """

    kind: str
    data: Path
    split: str = "train"
    checkpoint: Path | None = None
    encoder: str = "minilm"
    chunk_len: int = 16
    context_len: int = 256
    stride: int = 128
    rows_per_part: int = 0
    workers: int = 1
    batch_size: int = 0
    device: str = "cpu"
    num_gpus: float | None = None
    num_cpus: float = 1.0
    threads: int = 0
    address: str | None = None
    progress: bool = True

    @property
    def part_rows(self) -> int:
        return self.rows_per_part or DEFAULT_ROWS_PER_PART[self.kind]

    @property
    def batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH[self.kind]

    @property
    def gpus(self) -> float:
        return self.num_gpus if self.num_gpus is not None else float(self.device.startswith("cuda"))

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


@dataclass(frozen=True)
class PartSpec:
    """Part `index`: windows or chunks [first, last), which give source rows [row_start, row_end)."""

    index: int
    first: int
    last: int
    row_start: int
    row_end: int


def check_config(config: EncodeJobConfig) -> None:
    """Raises ValueError (naming the field) or FileNotFoundError for a config the job cannot run."""
    if config.kind not in PAYLOAD_FILES:
        raise ValueError(f"kind must be one of {sorted(PAYLOAD_FILES)}, got {config.kind!r}")
    for name, least in (("workers", 1), ("chunk_len", 1), ("context_len", 1), ("rows_per_part", 0),
                        ("batch_size", 0), ("threads", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be >= {least}, got {getattr(config, name)}")
    if config.num_cpus <= 0 or config.gpus < 0:
        raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {config.num_cpus} and {config.gpus}")
    if config.device.startswith("cuda") and config.gpus == 0:
        raise ValueError(f"device {config.device!r} needs num_gpus > 0 per worker")
    if config.device.startswith("cuda:"):  # an actor sees only the GPUs Ray gave it, numbered from 0
        raise ValueError(f"device {config.device!r} names one GPU, but each worker actor takes its own: give 'cuda'")
    if config.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {config.encoder!r}")
    if config.kind == "knnlm" or config.encoder == "lm":
        if config.checkpoint is None:
            what = "a kNN-LM source" if config.kind == "knnlm" else "a RETRO source with encoder 'lm'"
            raise ValueError(f"checkpoint is required for {what}")
        if not Path(config.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {config.checkpoint} not found")
    if not (Path(config.data) / "tokenizer.json").is_file():  # the split must be of its tokenizer
        raise FileNotFoundError(f"{config.data} holds no tokenizer.json (run lm-worker prepare)")


def check_lm_chunk_len(chunk_len: int, checkpoint: Path) -> None:
    """Refuses RETRO chunks longer than the LM at `checkpoint` takes, where it embeds them (encoder "lm"):
    a ValueError naming `chunk_len`, before any chunk is embedded."""
    from lm_worker.models.checkpoint import checkpoint_max_len

    max_len = checkpoint_max_len(checkpoint)
    if max_len is not None and chunk_len > max_len:
        raise ValueError(f"chunk_len {chunk_len} exceeds the max_len {max_len} of the LM at {checkpoint}, which "
                         "embeds each chunk whole")


def _count(n: float, what: str) -> str:
    """`n` `what`s, e.g. "1 GPU", "0.5 CPUs"."""
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def no_room_for_a_worker(config: EncodeJobConfig, nodes: list[dict]) -> str:
    """Why no worker actor of `config` can start on `nodes` (as `ray.nodes()` lists them), in one line that
    names the flags; "" where a live node has, in all, the CPUs and GPUs one worker takes. Ray Data waits
    for a worker no node can take until one joins: forever on a cluster that takes no node."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(r.get("CPU", 0.0) >= config.num_cpus and r.get("GPU", 0.0) >= config.gpus for r in alive):
        return ""
    most = {name: max((r.get(name, 0.0) for r in alive), default=0.0) for name in ("CPU", "GPU")}
    takes, have = _count(config.num_cpus, "CPU") + " (--worker-cpus)", _count(most["CPU"], "CPU")
    if config.gpus:
        takes += f" and {_count(config.gpus, 'GPU')} (--device {config.device})"
        have += f", {_count(most['GPU'], 'GPU')}"
    return f"no node of the Ray cluster can take an encode worker of {takes}: its live nodes have at most {have}"


def plan_parts(config: EncodeJobConfig, n_tokens: int) -> list[PartSpec]:
    """The parts of a stream of `n_tokens` tokens, in row order; together they cover every row once.
    RETRO parts hold `part_rows` chunks; kNN-LM parts whole batches of windows, each keying `stride` rows
    (the first `context_len`), so `part_rows` rounded up to a multiple of batch x stride.

    Raises:
        ValueError: a stream too short for one row, or a stride outside [1, context_len].
    """
    if config.kind == "retro":
        C = n_tokens // config.chunk_len
        if C == 0:
            raise ValueError(f"the {config.split} split has {n_tokens} tokens: no complete chunk of {config.chunk_len}")
        step = config.part_rows
        return [PartSpec(i, a, min(C, a + step), a, min(C, a + step)) for i, a in enumerate(range(0, C, step))]
    n = n_tokens - 1
    if n < 1:
        raise ValueError(f"the {config.split} split has {n_tokens} tokens; a kNN-LM source needs at least 2")
    windows = knn_windows(n, config.context_len, config.stride)
    windows_per_part = -(-config.part_rows // config.stride)  # rounded up: at least part_rows rows
    per_part = -(-windows_per_part // config.batch) * config.batch  # whole batches, rounded up again
    bounds = [(a, min(len(windows), a + per_part)) for a in range(0, len(windows), per_part)]
    return [PartSpec(i, a, z, windows[a][1], windows[z - 1][2]) for i, (a, z) in enumerate(bounds)]


def part_dir(out_dir: Path, index: int) -> Path:
    """The folder of part `index` of the source at `out_dir`."""
    return Path(out_dir) / PARTS / f"{index:05d}"

