"""What the pipeline runs (`PipelineConfig`, with the demo's sizes) and where it put the results (`PipelineReport`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lm_worker.data.token_store import RETRO_SPLIT
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.training.config import TrainConfig

PROMPTS = ("def read_config(path):\n", "class Parser:\n    def __init__(self", "import os\nimport sys\n\n")


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of every stage and where it runs. The defaults fit 2 CPU cores in well under an hour; `demo()` in
    under 20 minutes. The held-out split is cut into validation text (its last `tune_tokens` tokens, where
    kNN-LM's temperature is chosen) and test documents (the rest), where every reported perplexity is measured.
    `encode_workers` are Ray Data actors (at least one); `eval_workers` LM worker actors (0: evaluation in this
    process); `serve_on_ray` serves the shards as Ray actors (else local processes). `retro_encoder` embeds
    RETRO's chunks: "minilm", or "lm" (the trained base LM's key at each chunk's last token). `retro_init`: "lm"
    retro-fits RETRO onto the trained base LM (its decoder frozen, only CCA and the neighbour encoder train),
    "scratch" trains RETRO's own decoder (`retro.preset`) from random weights. A retro-fitted RETRO trains on
    `max_retro_tokens` tokens of training-side documents the LM never saw (the "retro" split; 0: on the LM's own
    training text, where the frozen LM predicts so well from memory that the neighbours add little)."""

    run: Path = Path("runs/stdlib")
    corpus: str = "stdlib"
    vocab_size: int = 4096
    max_train_tokens: int = 800_000
    max_heldout_tokens: int = 40_000
    max_retro_tokens: int = 3_200_000
    lm: TrainConfig = field(default_factory=lambda: TrainConfig(kind="lm", preset="small", steps=500, eval_every=50))
    retro: TrainConfig = field(default_factory=lambda: TrainConfig(kind="retro", preset="small", steps=1600,
                                                                   batch_size=8, chunk_len=8, eval_every=50))
    n_neighbours: int = 2
    context_len: int = 256
    stride: int = 128
    shards: int = 2
    knn: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(k=1024, nprobe=32))
    retro_nprobe: int = 32
    retro_encoder: str = "lm"
    retro_init: str = "lm"
    eval_tokens: int = 0
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    tune_tokens: int = 4096
    encode_workers: int = 2
    eval_workers: int = 2
    serve_on_ray: bool = True
    address: str | None = None
    num_cpus: int = 0  # logical CPUs of a local Ray cluster; 0: max(4, the machine's)
    samples: int = 3
    sample_tokens: int = 48
    progress: bool = True
    expected_minutes: int | None = 51  # of these sizes, from an empty run folder on 2 CPU cores (measured;
    # `describe` says it); None: not measured (other sizes), and `describe` says nothing of the time

    def __post_init__(self):
        if self.retro_init not in ("lm", "scratch"):
            raise ValueError(f"retro_init must be 'lm' or 'scratch', got {self.retro_init!r}")
        if self.max_retro_tokens < 0:
            raise ValueError(f"max_retro_tokens must be >= 0, got {self.max_retro_tokens}")
        if self.tune_tokens < 2:  # one token is only an EOS: no validation text to choose kNN-LM's temperature on
            raise ValueError(f"tune_tokens must be at least 2 (the last held-out tokens kNN-LM's temperature and λ "
                             f"are chosen on), got {self.tune_tokens}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """ValueError naming the first size no stage could run with, before any stage runs (each would
        otherwise fail only when it is reached, the stages before it done for nothing)."""
        for name in ("shards", "n_neighbours", "context_len", "stride"):
            if not isinstance(value := getattr(self, name), int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r:.40}")
        for name in ("encode_workers", "eval_workers", "eval_tokens", "samples"):
            if not isinstance(value := getattr(self, name), int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r:.40}")
        if self.stride > self.context_len:  # windows further apart than they are long would skip tokens
            raise ValueError(f"stride must be at most context_len ({self.context_len}), got {self.stride}")
        if self.retro.chunk_len < 1:  # TrainConfig's 0 ("the preset's"): the pipeline encodes in chunks of it itself
            raise ValueError(f"retro.chunk_len must be given (>= 1): RETRO's source is encoded in chunks of it, "
                             f"got {self.retro.chunk_len}")
        if self.context_len % self.retro.chunk_len or self.stride % self.retro.chunk_len:  # RETRO's windows too
            raise ValueError(f"context_len ({self.context_len}) and stride ({self.stride}) must be multiples of "
                             f"RETRO's chunk_len ({self.retro.chunk_len}): RETRO is evaluated over the same windows")
        if not self.temperatures or not all(isinstance(t, int | float) and 0 < t < math.inf for t in self.temperatures):
            raise ValueError(f"temperatures must be one or more positive, finite numbers, "
                             f"got {self.temperatures!r:.80}")

    @property
    def retro_split(self) -> str:
        """The split RETRO trains on: "retro" (text the LM never saw) when retro-fitted with one, else "train"."""
        return RETRO_SPLIT if self.retro_init == "lm" and self.max_retro_tokens else "train"

    @classmethod
    def demo(cls, run: Path = Path("runs/demo"), **overrides) -> PipelineConfig:
        """The demo's sizes: every stage at CPU scale (`expected_minutes` on 2 cores)."""
        sizes = dict(run=run, max_train_tokens=300_000, max_heldout_tokens=16_000, max_retro_tokens=300_000,
                     lm=TrainConfig(kind="lm", preset="small", steps=300, batch_size=8, warmup=50, eval_every=50,
                                    checkpoint_every=100),
                     retro=TrainConfig(kind="retro", preset="small", steps=150, batch_size=8, chunk_len=8, warmup=30,
                                       eval_every=25, checkpoint_every=75),
                     expected_minutes=5)
        return cls(**{**sizes, **overrides})

    @classmethod
    def quick(cls, run: Path = Path("runs/demo-quick"), **overrides) -> PipelineConfig:
        """The smallest sizes at which every stage still runs and shows what it does (a tiny LM and
        RETRO, small datastores, a short evaluation): about a minute on 2 cores. Its figures show the
        pipeline working, not what retrieval gains (the demo and the full pipeline show that)."""
        sizes = dict(run=run, vocab_size=1024, max_train_tokens=60_000, max_heldout_tokens=8_000,
                     max_retro_tokens=40_000, tune_tokens=1024,
                     lm=TrainConfig(kind="lm", preset="tiny", steps=80, batch_size=8, seq_len=128, warmup=10,
                                    eval_every=20, checkpoint_every=80),
                     retro=TrainConfig(kind="retro", preset="tiny", steps=40, batch_size=8, seq_len=128, chunk_len=8,
                                       warmup=5, eval_every=10, checkpoint_every=40),
                     context_len=128, stride=64, knn=RetrievalConfig(k=64, nprobe=8), retro_nprobe=8,
                     temperatures=(1.0, 5.0, 20.0), eval_tokens=8_000, sample_tokens=24, expected_minutes=1)
        return cls(**{**sizes, **overrides})

    @property
    def eval_place(self) -> str:
        """Where the test split is evaluated: "on N LM worker actors", or "in this process" (0 workers)."""
        return f"on {self.eval_workers} LM worker actors" if self.eval_workers else "in this process"

    def describe(self) -> str:
        """What the run will do, and (`expected_minutes`, where measured) about how long it takes on 2 CPU
        cores from an empty run folder."""
        fitted = "retro-fitted onto the LM" if self.retro_init == "lm" else "from scratch"
        minutes = self.expected_minutes
        took = "" if minutes is None else \
            f"About {minutes} minute{'s' if minutes != 1 else ''} on 2 CPU cores from an empty run folder; "
        return (f"prepare the corpus; train the LM ({self.lm.steps} steps); encode and build the kNN-LM and RETRO "
                f"datastores ({self.shards} shards each); serve them; fetch RETRO's neighbours; train RETRO "
                f"({self.retro.steps} steps, {fitted}); choose kNN-LM's temperature and λ on validation text; "
                f"evaluate both {self.eval_place}; write samples and the report. {took}"
                f"{'a' if took else 'A'} rerun reuses what is there.")


@dataclass(frozen=True)
class PipelineReport:
    """Where everything went: the summary (evaluation table and stage times), the report folder."""

    run: Path
    table: str
    summary: str
    report: Path
    eval_json: Path
    plots: list[Path]
    samples: Path | None

