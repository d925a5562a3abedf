"""`lm-worker prepare` and `train`: the corpus split and tokenized, the base LM or RETRO trained."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lm_worker.cli.common import check_flags, check_folder, check_out_kind, fields_as_flags, int_in, positive_finite_arg

log = logging.getLogger(__name__)
MAX_VOCAB = 1_000_000  # past this the BPE trainer's tables outgrow a machine's memory


def add_parsers(sub) -> None:
    """Adds `prepare` and `train`."""
    p = sub.add_parser("prepare", help="split a corpus, train the BPE tokenizer, write token streams")
    p.add_argument("--out", type=Path, required=True,
                   help="the folder to write; one that `prepare` wrote before is replaced whole once the new one "
                        "is complete (refused while it holds --corpus or files prepare did not write)")
    p.add_argument("--corpus", default="stdlib", help="'stdlib', a folder of text files, or a .jsonl file")
    p.add_argument("--id-field", help="JSONL field naming each document: a string or an integer, each given once "
                                      "(default: the line number)")
    p.add_argument("--vocab-size", type=int_in(257, MAX_VOCAB), default=4096,
                   help=f"tokens in the BPE vocabulary: 257 (the 256 bytes and one more) to {MAX_VOCAB}")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--max-train-tokens", type=int, default=0, help="0: every training document")
    p.add_argument("--max-heldout-tokens", type=int, default=0)
    p.add_argument("--max-retro-tokens", type=int, default=0,
                   help="also write the 'retro' split: this many tokens of training-side documents the train split "
                        "left out, for retro-fitting RETRO onto the LM (0: no such split)")
    p.set_defaults(handler=run_prepare)

    t = sub.add_parser("train", help="train the base LM or RETRO", refuse=refuse_train)
    t.add_argument("--kind", choices=("lm", "retro"), default="lm")
    t.add_argument("--data", type=Path, required=True, help="a `prepare` output folder")
    t.add_argument("--out", type=Path, required=True, help="checkpoint folder (resumed when it has one)")
    t.add_argument("--neighbours", type=Path, help="RETRO: folder with neighbours-SPLIT.npy (see `neighbours`)")
    t.add_argument("--preset", choices=("tiny", "small", "gpu"), default="small")
    for name, default, low in (("steps", 2000, 1), ("seq-len", 256, 1), ("batch-size", 16, 1), ("eval-every", 200, 1),
                               ("checkpoint-every", 500, 1), ("chunk-len", 0, 0), ("seed", 0, 0)):
        t.add_argument(f"--{name}", type=int_in(low), default=default)
    t.add_argument("--warmup", type=int_in(0), default=100, help="steps of linear learning-rate warm-up")
    t.add_argument("--lr", type=positive_finite_arg, default=3e-3, help="peak learning rate (> 0, finite)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--init-from", type=Path, help="RETRO: retro-fit this base LM checkpoint (its decoder shape and "
                                                  "weights; new CCA layers start as a no-op)")
    t.add_argument("--train-base", action="store_true", help="with --init-from: train the LM's weights too "
                                                             "(default: frozen, only RETRO's new layers train)")
    t.add_argument("--split", default="train", help="the split of --data to train on: train, or retro (prepare "
                                                    "--max-retro-tokens) to retro-fit RETRO on text the LM never saw")
    t.set_defaults(handler=run_train)


# what `train`'s errors name, said as its flags
TRAIN_FLAGS = {"lr": "--lr", "neighbours_dir": "--neighbours", "resume=False": "--restart", "init_from": "--init-from",
               "kind 'retro'": "--kind retro", "seq_len": "--seq-len", "out_dir": "--out",
               "freeze_base=False": "--train-base", "freeze_base=True": "no --train-base",
               "freeze_base": "--train-base"}


def refuse_train(args: argparse.Namespace) -> None:
    """Refuses `train` flags that would be ignored: --train-base without --init-from, --neighbours and
    --chunk-len for the LM."""
    if args.train_base and not args.init_from:
        raise ValueError("--train-base applies with --init-from only: give --init-from, or leave it out")
    if args.neighbours and args.kind == "lm":
        raise ValueError("--neighbours applies to --kind retro only: the LM reads no neighbours")
    if args.chunk_len and args.kind == "lm":
        raise ValueError("--chunk-len applies to --kind retro only: the LM reads no chunks")


def check_prepare_out(out: Path, corpus: str) -> None:
    """Refuses an --out that prepare's whole replacement would take more from than it wrote: one that holds
    --corpus, or a prepared folder that holds other entries too (a few named). A ValueError naming the flags."""
    from lm_worker.data.prepare import foreign_entries

    place = out.resolve()
    if corpus != "stdlib" and (place == Path(corpus).resolve() or place in Path(corpus).resolve().parents):
        raise ValueError(f"--corpus {corpus} lies inside --out {out}, which prepare replaces whole: move the "
                         "corpus out of it, or choose another --out")
    if names := foreign_entries(out):
        shown = ", ".join(repr(name[:60]) for name in names[:3]) + (f" and {len(names) - 3} more" * (len(names) > 3))
        raise ValueError(f"--out {out} holds {shown}, which prepare did not write and would delete as it replaces "
                         "the folder whole: move them out of it, or choose another --out")


def run_prepare(args: argparse.Namespace) -> None:
    from lm_worker.data.prepare import PrepareConfig, prepare_corpus

    check_flags(*((flag, value, value >= 0, ">= 0") for flag, value in (
                    ("--max-train-tokens", args.max_train_tokens), ("--max-heldout-tokens", args.max_heldout_tokens),
                    ("--max-retro-tokens", args.max_retro_tokens))),
                ("--heldout-fraction", args.heldout_fraction, 0 < args.heldout_fraction < 1, "in (0, 1)"))
    if args.max_retro_tokens and not args.max_train_tokens:  # the retro split takes what train left out
        raise ValueError(f"--max-train-tokens 0 trains on every training document, which leaves none for "
                         f"--max-retro-tokens {args.max_retro_tokens}: give a --max-train-tokens budget, or leave "
                         "--max-retro-tokens out")
    check_folder(args.out, "--out")
    check_out_kind(args.out, "--out", ("a prepared corpus",), "a folder that `prepare` wrote")
    check_prepare_out(args.out, args.corpus)
    with fields_as_flags({"heldout_fraction": "--heldout-fraction", "id_field": "--id-field"}):
        r = prepare_corpus(PrepareConfig(out=args.out, corpus=args.corpus, vocab_size=args.vocab_size,
                                         heldout_fraction=args.heldout_fraction,
                                         max_train_tokens=args.max_train_tokens,
                                         max_heldout_tokens=args.max_heldout_tokens,
                                         max_retro_tokens=args.max_retro_tokens, id_field=args.id_field,
                                         progress=not args.no_progress))
    print(f"tokenizer {r.tokenizer_fingerprint} ({r.vocab_size} tokens) -> {r.out / 'tokenizer.json'}")
    print("| split | documents | tokens |\n|---|---:|---:|")
    for split in r.documents:
        print(f"| {split} | {r.documents[split]} | {r.tokens[split]} |")
    if r.empty:
        print(f"left out {r.empty} empty document{'s' * (r.empty != 1)} (whitespace alone)")


def check_train_window(args: argparse.Namespace) -> None:
    """ValueError when --neighbours' train-split file left out each chunk's documents for a shorter window than
    --seq-len (`lm-worker neighbours --seq-len`): the longer window would predict text a chunk retrieved. A
    longer recorded window left out more than needed: trained on, with a warning."""
    from lm_worker.sources.neighbours import WINDOW_RECORD, recorded_window

    if args.kind != "retro" or args.neighbours is None or args.split != "train":
        return
    path = args.neighbours / "neighbours-train.npy"
    if not path.is_file():
        return  # named as missing by the training's own checks
    window = recorded_window(args.neighbours)
    if window is None:
        log.warning("%s has no %s beside it: the window its own-document exclusions were made for is unknown",
                    path, WINDOW_RECORD)
    elif window < args.seq_len:
        raise ValueError(f"--neighbours {args.neighbours}: neighbours-train.npy left out each chunk's documents "
                         f"for a window of {window} tokens, --seq-len is {args.seq_len}: train with --seq-len "
                         f"{window}, or fetch them again with `lm-worker neighbours --seq-len {args.seq_len}`")
    elif window > args.seq_len:
        log.warning("%s left out each chunk's documents for a window of %d tokens, longer than --seq-len %d: "
                    "more than needed (`lm-worker neighbours --seq-len %d` leaves out just enough)", path, window,
                    args.seq_len, args.seq_len)


def run_train(args: argparse.Namespace) -> None:
    from lm_worker.training.config import TrainConfig
    from lm_worker.training.train import train

    check_folder(args.out, "--out")
    check_out_kind(args.out, "--out", ("a checkpoint folder", "other files"), "a checkpoint folder")
    check_train_window(args)
    with fields_as_flags({**TRAIN_FLAGS, "split": "--split"}):  # the config's own messages start with it
        config = TrainConfig(kind=args.kind, preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                             steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup,
                             eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                             device=args.device, amp=not args.no_amp, chunk_len=args.chunk_len,
                             init_from=str(args.init_from or ""), freeze_base=not args.train_base, split=args.split)
    with fields_as_flags(TRAIN_FLAGS):
        r = train(config, args.data, args.out, neighbours_dir=args.neighbours, resume=not args.restart,
                  progress=not args.no_progress)
    speed = f", {r.tokens_per_s:.0f} tokens/s" if r.tokens_per_s else " (already trained: no step run)"
    print(f"{r.steps} steps: train loss {r.train_loss:.4f}, held-out loss {r.heldout_loss:.4f}{speed}\n"
          f"checkpoint {r.checkpoint}\nloss curves {r.plot}")
