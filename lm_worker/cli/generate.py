"""`lm-worker generate` and `attention`: decoding while retrieving, and RETRO's attention to its neighbours."""

from __future__ import annotations

import argparse
from pathlib import Path

from lm_worker.cli.common import (
    LM_KINDS,
    RETRO_KINDS,
    add_encoder_lm_arg,
    add_retrieval_args,
    add_security_args,
    check_checkpoints,
    check_datastore_kind,
    check_datastore_tokenizer,
    check_file_to_write,
    check_flags,
    check_tokenizers,
    fields_as_flags,
    int_in,
    need_retriever,
    open_retriever,
    positive_finite,
    retrieval_flags,
    search_checks,
    security_of,
    shown_text,
)

# From this many prompts on, kNN-LM greedy and sampling decode two prompt groups in turn by default: in
# benchmarks/decoding.py (model and servers on a core each) the pipeline read 1.09-1.23x serial's tokens/s
# at 16 prompts and 1.05-1.38x at 32; in one later run, with both sending each request from within the
# forward, 1.18x against 1.12x at 32 prompts and 1.08x against 1.10x at 8 (docs/results.md).
PIPELINE_PROMPTS = 16
MAX_BEAMS = 64  # each beam keeps its own cache and scores the whole vocabulary each step: more grows without use
DEFAULT_LAM, DEFAULT_KNN_TEMPERATURE = 0.25, 1.0  # kNN-LM mixing unless --lam, --knn-temperature
# Each strategy's own options: (flag, dest, GenerateConfig field); another strategy refuses them when given
STRATEGY_OPTIONS = {"greedy": (), "sample": (("--temperature", "temperature", "temperature"),
                                             ("--top-k", "top_k", "top_k"), ("--top-p", "top_p", "top_p"),
                                             ("--seed", "seed", "seed")),
                    "beam": (("--beams", "beams", "num_beams"), ("--length-penalty", "length_penalty",
                                                                 "length_penalty"))}
# GenerateConfig's fields (and check_room's words) as generate's flags, for their own errors
GENERATE_FIELDS = {"max_new_tokens": "--max-new-tokens", **{field: flag for options in STRATEGY_OPTIONS.values()
                                                            for flag, _, field in options}}


def add_parsers(sub) -> None:
    """Adds `generate` and `attention`."""
    g = sub.add_parser("generate", help="decode with greedy, sampling or beam search while retrieving")
    g.add_argument("--checkpoint", type=Path, required=True, help="an LM (kNN-LM) or RETRO checkpoint")
    g.add_argument("--data", type=Path, required=True, help="the `prepare` folder (for the tokenizer)")
    g.add_argument("--prompt", action="append", default=[],
                   help="a prompt; repeat for a batch (prompts of different token counts are decoded in "
                        "batches of one length each, in full: the models take no padding)")
    g.add_argument("--prompt-file", type=Path, help="prompts, one per line")
    g.add_argument("--strategy", choices=tuple(STRATEGY_OPTIONS), default="greedy",
                   help="greedy (the default), sample or beam; each refuses the options of the others")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, help="sample: softmax temperature (default 1)")
    g.add_argument("--top-k", type=int, help="sample: keep the k most likely tokens (default 0: all)")
    g.add_argument("--top-p", type=float, help="sample: keep the most likely tokens up to probability p "
                                               "(default 1: all)")
    g.add_argument("--seed", type=int, help="sample: seed of the samplers (default 0)")
    g.add_argument("--beams", type=int_in(1, MAX_BEAMS),
                   help=f"beam: beams per prompt (default 4, at most {MAX_BEAMS})")
    g.add_argument("--length-penalty", type=float,
                   help="beam: alpha of the length normalisation, in [-10, 10] (default 0.6)")
    g.add_argument("--lam", type=float, help=f"kNN-LM: λ, the neighbours' weight (default {DEFAULT_LAM})")
    g.add_argument("--knn-temperature", type=float,
                   help=f"kNN-LM: the temperature of the neighbours' distances (default {DEFAULT_KNN_TEMPERATURE})")
    g.add_argument("--prefetch", type=int, default=0, help="RETRO: send a chunk's query this many tokens early")
    g.add_argument("--no-overlap", action="store_true",
                   help="retrieve serially: RETRO's prefetched queries when needed, kNN-LM each step's request "
                        "sent once the forward is done (by default it leaves as soon as the model has the keys, "
                        "and the output head runs while the service searches), and no prompt-group pipeline")
    g.add_argument("--knn-pipeline", action="store_true",
                   help="kNN-LM: decode two groups of prompts in turn so one's retrieval overlaps the other's "
                        f"model step; the default for greedy and sampling from {PIPELINE_PROMPTS} prompts of one "
                        "length on (prompts of each length decode as a batch of their own) "
                        "(below, and with beam search, each step's request leaves as soon as the model has its "
                        "keys, and the output head runs while the service searches); with beam search, on "
                        "request only")
    g.add_argument("--ralmspec", action="store_true",
                   help="kNN-LM: guess each step's neighbours from each prompt's local cache of the rows it "
                        "retrieved and their successors, verified for all prompts in one request every s steps; a "
                        "prompt whose guess failed rolls back alone (RaLMSpec). RETRO: guess each chunk's "
                        "neighbours likewise and decode on while the service searches, where guesses have been "
                        "holding; a failed guess rolls the batch back, or only its prompt with --rollback row "
                        "(greedy and sampling). The tokens of serial retrieval; needs a datastore that keeps its keys "
                        "(lm-worker build does; retriever-server build --keep-keys)")
    g.add_argument("--rollback", choices=("batch", "row"),
                   help="with --ralmspec, RETRO: where a prompt's guessed neighbours were wrong, batch (the default) "
                        "decodes the whole batch again from that step, row only that prompt (the prompts keep their "
                        "own lengths and meet at each chunk's end, where the batch's query and neighbour encoding "
                        "are shared; slower than batch on a small CPU model, see docs/results.md)")
    g.add_argument("--stride", type=int, default=0,
                   help="with --ralmspec: steps between verifications (0: chosen from the measured hit rate and costs)")
    g.add_argument("--guess", choices=("cache", "lm"), default="cache",
                   help="with --ralmspec, kNN-LM greedy or sampling: cache guesses each step's neighbours from the "
                        "local caches; lm guesses each step's token as the LM's own, verified while the next step "
                        "is computed on it (no local caches or stored keys needed; pays where the LM alone mostly "
                        "picks kNN-LM's token)")
    g.add_argument("--no-retrieval", action="store_true",
                   help="the model alone (else --target or --datastore is required)")
    add_retrieval_args(g, 0, k_help="neighbours per query: kNN-LM's (0, the default: 1024); RETRO retrieves its "
                                    "model's n_neighbours and takes no --k")
    add_encoder_lm_arg(g)
    add_security_args(g)
    g.set_defaults(handler=run_generate)

    a = sub.add_parser("attention", help="plot which neighbour tokens a RETRO chunk attends to")
    a.add_argument("--retro", type=Path, required=True)
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True, help="the PNG to write (a name ending in .png)")
    a.add_argument("--text", help="text to run (default: the start of the held-out split)")
    a.add_argument("--chunk", type=int, default=1, help="the chunk whose neighbours are shown (from 0; its text "
                                                         "must hold it whole)")
    add_retrieval_args(a, 0)
    add_encoder_lm_arg(a)
    add_security_args(a)
    a.set_defaults(handler=run_attention)


def _prompts(args: argparse.Namespace, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The prompts' texts and token ids, --prompt's first, then --prompt-file's non-blank lines."""
    texts = list(args.prompt)
    if args.prompt_file:
        try:
            text = args.prompt_file.read_text(encoding="utf-8-sig")  # a byte order mark is not the prompt's
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {err.start}: "
                             f"{err.reason})") from None
        except OSError as err:
            raise ValueError(f"--prompt-file {args.prompt_file} cannot be read: {err.strerror or err}") from None
        # "\n" alone ends a line (str.splitlines also splits on form feeds, \x1c-\x1e, \x85 and U+2028)
        lines = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        if not lines and not texts:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt (one per line)")
        texts += lines
    if not texts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file")
    ids = [tokenizer.encode(t) for t in texts]
    for text, row in zip(texts, ids):
        if not row:
            raise ValueError(f"--prompt {text!r} is empty: a prompt needs at least one token")
    return texts, ids


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuses numbers no decoding takes, naming the flag, before any work (options not given pass)."""
    from lm_worker.decoding.config import MAX_LENGTH_PENALTY

    def given(value, ok) -> bool:
        return value is None or ok(value)

    check_flags(("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                ("--temperature", args.temperature, given(args.temperature, positive_finite), "> 0 and finite"),
                ("--top-k", args.top_k, given(args.top_k, lambda v: v >= 0), ">= 0 (0: all tokens)"),
                ("--top-p", args.top_p, given(args.top_p, lambda v: 0 < v <= 1), "in (0, 1]"),
                ("--length-penalty", args.length_penalty,
                 given(args.length_penalty, lambda a: -MAX_LENGTH_PENALTY <= a <= MAX_LENGTH_PENALTY),
                 f"in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}]"),
                ("--lam", args.lam, given(args.lam, lambda v: 0 <= v <= 1), "in [0, 1]"),
                ("--knn-temperature", args.knn_temperature, given(args.knn_temperature, positive_finite),
                 "> 0 and finite"),
                ("--stride", args.stride, args.stride >= 0, ">= 0 (0: chosen as it decodes)"),
                *((f"--{name}", getattr(args, name), getattr(args, name) >= 0, ">= 0")
                  for name in ("k", "nprobe", "rerank")))


def _names(flags: list[str]) -> str:
    """["--a"] -> "--a"; ["--a", "--b", "--c"] -> "--a, --b and --c"."""
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def _check_options(args: argparse.Namespace, kind: str, n_neighbours: int | None) -> None:
    """Refuses options that do not apply to this checkpoint, to the strategy or to each other, before any work."""
    retro = kind == "retro"
    foreign = [flag for strategy, options in STRATEGY_OPTIONS.items() if strategy != args.strategy
               for flag, dest, _ in options if getattr(args, dest) is not None]
    if foreign:  # e.g. "--seed applies to --strategy sample and --beams to --strategy beam only, not to ..."
        groups = [(flags, strategy) for strategy, options in STRATEGY_OPTIONS.items()
                  if (flags := [flag for flag, _, _ in options if flag in foreign])]
        verb = " applies" if len(groups[0][0]) == 1 else " apply"
        said = " and ".join(f"{_names(flags)}{verb if i == 0 else ''} to --strategy {strategy}"
                            for i, (flags, strategy) in enumerate(groups))
        raise ValueError(f"{said} only, not to --strategy {args.strategy}")
    if args.no_retrieval and (args.target or args.datastore):
        raise ValueError("--no-retrieval decodes with the model alone: it takes no --target or --datastore")
    if args.no_retrieval and args.ralmspec:
        raise ValueError("--ralmspec speculates retrieval: --no-retrieval decodes with the model alone")
    if args.ralmspec and kind == "hf":  # RaLMSpecKnnLM's own refusal, before any server starts
        raise ValueError("--ralmspec speculative retrieval needs a TransformerLM (per-row positions): it takes a "
                         "checkpoint of kind 'lm', and --checkpoint is a Hugging Face model (kind 'hf')")
    unused = [flag for flag, value in (("--k", args.k), ("--nprobe", args.nprobe), ("--rerank", args.rerank),
                                       ("--no-overlap", args.no_overlap), ("--encoder-lm", args.encoder_lm),
                                       ("--knn-pipeline", args.knn_pipeline),
                                       ("--prefetch", args.prefetch if retro else 0),  # else: RETRO's, said below
                                       ("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                                       ("--tls-key", args.tls_key), ("--tls-server-name", args.tls_server_name),
                                       ("--auth-token-file", args.auth_token_file),
                                       ("--allow-plaintext-token", args.allow_plaintext_token)) if value]
    if args.no_retrieval and unused:
        raise ValueError(f"{_names(unused)} set{'s' * (len(unused) == 1)} retrieval: --no-retrieval decodes with "
                         "the model alone")
    if retro and args.stride:
        raise ValueError("--stride sets how many steps kNN-LM's --ralmspec guesses between verifications: RETRO's "
                         "--ralmspec guesses each chunk's neighbours and has no stride")
    if retro and args.k:
        raise ValueError(f"--k sets kNN-LM's neighbours per query: RETRO retrieves its model's {n_neighbours} "
                         "per chunk")
    if not retro and args.prefetch:
        raise ValueError("--prefetch is RETRO's: a kNN-LM step's query exists only once its forward has run")
    check_flags(("--prefetch", args.prefetch, args.prefetch >= 0, ">= 0"))
    if retro and args.ralmspec and args.prefetch:
        raise ValueError("--ralmspec speculates RETRO's exact queries: it takes no --prefetch")
    if args.ralmspec and args.no_overlap:
        raise ValueError("--no-overlap retrieves serially: --ralmspec speculates retrieval and verifies it as it "
                         "decodes")
    if args.stride and not args.ralmspec:
        raise ValueError("--stride sets --ralmspec's steps between verifications: it takes --ralmspec")
    if args.guess != "cache" and (not args.ralmspec or retro):
        raise ValueError("--guess lm speculates kNN-LM decoding: it takes --ralmspec and an LM checkpoint")
    if args.ralmspec and args.strategy == "beam" and (retro or args.guess != "cache"):
        raise ValueError("--ralmspec with --strategy beam guesses kNN-LM's neighbours from the local caches: "
                         "it takes an LM checkpoint and no --guess lm (RETRO's speculation decodes greedily or "
                         "samples)")
    if args.rollback and (not args.ralmspec or not retro or args.no_retrieval):
        raise ValueError("--rollback chooses how RETRO's speculated chunks roll back: it takes --ralmspec, "
                         "retrieval and a RETRO checkpoint (kNN-LM's --ralmspec always rolls back per prompt)")
    if args.knn_pipeline and (retro or args.no_overlap or args.ralmspec):
        raise ValueError("--knn-pipeline overlaps kNN-LM's retrieval with compute: it takes an LM checkpoint, and "
                         "no --no-overlap or --ralmspec")
    mixing = [flag for flag, value in (("--lam", args.lam), ("--knn-temperature", args.knn_temperature))
              if value is not None]
    if mixing and (retro or args.no_retrieval):
        raise ValueError(f"{_names(mixing)} set{'s' * (len(mixing) == 1)} kNN-LM's mixing with the neighbours: "
                         f"{'it takes' if len(mixing) == 1 else 'they take'} an LM checkpoint and retrieval")
    if not args.no_retrieval and not (args.target or args.datastore):
        raise ValueError("--target or --datastore is required to retrieve while decoding (--no-retrieval: the "
                         "model alone)")


def _stepper(args: argparse.Namespace, loaded, retriever, tokenizer):
    from lm_worker.decoding.knnlm_stepper import KnnLMStepper
    from lm_worker.decoding.lm_stepper import LMStepper

    if retriever is None:
        return LMStepper(loaded.model)
    if loaded.kind == "retro":
        from lm_worker.decoding.retro_stepper import RetroStepper
        from lm_worker.encoders.registry import chunk_encoder_for

        encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
        if args.ralmspec:
            from lm_worker.decoding.ralmspec.retro import RaLMSpecRetro

            return RaLMSpecRetro(loaded.model, retriever, encoder, rollback=args.rollback or "batch")
        return RetroStepper(loaded.model, retriever, encoder, prefetch=args.prefetch, overlap=not args.no_overlap)
    if args.ralmspec:
        from lm_worker.decoding.ralmspec.config import SpeculationConfig
        from lm_worker.decoding.ralmspec.decoder import RaLMSpecKnnLM

        speculation = SpeculationConfig(stride=args.stride, guess=args.guess, asynchronous=args.guess == "lm")
        return RaLMSpecKnnLM(loaded.model, retriever, lam=_lam(args), temperature=_knn_temperature(args),
                             speculation=speculation)
    return KnnLMStepper(loaded.model, retriever, lam=_lam(args), temperature=_knn_temperature(args),
                        overlap=args.knn_pipeline, early=not args.no_overlap)  # else set per batch (run_generate)


def _lam(args: argparse.Namespace) -> float:
    return DEFAULT_LAM if args.lam is None else args.lam


def _knn_temperature(args: argparse.Namespace) -> float:
    return DEFAULT_KNN_TEMPERATURE if args.knn_temperature is None else args.knn_temperature


def _length_groups(ids: list[list[int]]) -> list[list[int]]:
    """The prompts' indices grouped by token count, each group in order, the groups as their lengths first come."""
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(ids):
        groups.setdefault(len(row), []).append(r)
    return list(groups.values())


def run_generate(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from lm_worker.data.prepare import load_prepared
    from lm_worker.decoding.config import GenerateConfig
    from lm_worker.decoding.generate import check_room, generate
    from lm_worker.decoding.knnlm_stepper import KnnLMStepper
    from lm_worker.models.checkpoint import load_checkpoint

    _check_numbers(args)
    check_checkpoints(("--encoder-lm", args.encoder_lm, LM_KINDS))
    tokenizer, _, _ = load_prepared(args.data)
    check_tokenizers(tokenizer, ("--checkpoint", args.checkpoint))
    loaded = load_checkpoint(args.checkpoint)  # any kind: kNN-LM decodes an LM, RETRO its own
    texts, ids = _prompts(args, tokenizer)
    n_neighbours = getattr(loaded.model.config, "n_neighbours", None)
    _check_options(args, loaded.kind, n_neighbours)
    if loaded.kind == "retro":  # before any server starts (RetroStepper would name its own field, later)
        L = loaded.model.config.chunk_len
        check_flags(("--prefetch", args.prefetch, args.prefetch < L, f"below --checkpoint's chunk length {L}"))
    chosen = {field: getattr(args, dest) for _, dest, field in STRATEGY_OPTIONS[args.strategy]
              if getattr(args, dest) is not None}  # the rest: GenerateConfig's defaults
    with fields_as_flags(GENERATE_FIELDS):
        config = GenerateConfig(strategy=args.strategy, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                                **chosen)
        check_room(loaded, max(len(row) for row in ids), config.max_new_tokens)  # before any server starts
    groups = _length_groups(ids)
    k = n_neighbours if loaded.kind == "retro" else (args.k or 1024)
    flags, kind = retrieval_flags(args), "retro" if loaded.kind == "retro" else "knnlm"
    check_flags(*search_checks(flags, k))
    check_datastore_kind(flags, kind)  # a --datastore's, before it is served
    with open_retriever(flags, k=k, security=security_of(args)) as retriever:
        if retriever is not None:
            check_datastore_kind(flags, kind, retriever)
            check_datastore_tokenizer(retriever, tokenizer, flags)
        stepper = _stepper(args, loaded, retriever, tokenizer)
        decoded, pipelined = {}, False
        try:
            for rows in groups:  # a batch per prompt length, in the order the lengths first come; each prompt's
                # place among the prompts seeds its sampler, whichever prompts share its length
                if isinstance(stepper, KnnLMStepper) and not args.knn_pipeline:  # pipelined by the batch's size
                    stepper.overlap = (len(rows) >= PIPELINE_PROMPTS and config.strategy != "beam"
                                       and not args.no_overlap)
                pipelined |= getattr(stepper, "pipelined", False) and len(rows) > 1
                out = generate(stepper, torch.tensor([ids[r] for r in rows], dtype=torch.long),
                               dataclasses.replace(config, rows=tuple(rows)))
                decoded.update({r: out.tokens[i, :int(out.lengths[i])].tolist() for i, r in enumerate(rows)})
        finally:
            close = getattr(stepper, "close", None)  # RetroStepper's prefetch thread
            if close is not None:
                close()
    for r, text in enumerate(texts):
        print(f"--- {text!r}\n{shown_text(tokenizer.decode(decoded[r]))}")
    s = getattr(stepper, "stats", None)
    if s is not None and s.retrieval_calls:
        guesses = f"; next token guessed right for {s.guessed_right} of {s.guessed} rows" if s.guessed else ""
        if getattr(s, "verified", 0):
            unit = "chunks" if loaded.kind == "retro" else "steps"
            rolled = "batch rollbacks" if getattr(stepper, "rollback", "row") == "batch" else "rows rolled back"
            guesses = f"; {s.accepted} of {s.verified} guessed {unit} held, {s.rollbacks} {rolled}"
        pipeline = "; two prompt groups pipelined" if pipelined else ""
        early = "; each request sent once the keys were out" if getattr(stepper, "early", False) else ""
        print(f"\nretrieval: {s.retrieval_calls} calls, {s.retrieval_s:.2f} s, blocked {s.wait_s:.2f} s; "
              f"model {s.compute_s:.2f} s{guesses}{pipeline}{early}")


def run_attention(args: argparse.Namespace) -> None:
    import numpy as np

    from lm_worker.data.prepare import load_prepared
    from lm_worker.encoders.registry import chunk_encoder_for
    from lm_worker.evaluation.attention_plot import plot_retrieved_attention
    from lm_worker.models.checkpoint import load_checkpoint

    check_flags(("--chunk", args.chunk, args.chunk >= 0, ">= 0"),
                ("--out", args.out, args.out.suffix.lower() == ".png", "a file name ending in .png"),
                ("--out", args.out, not args.out.is_dir(), "a file to write, not a folder"),
                ("--text", repr(args.text), args.text is None or bool(args.text.strip()),
                 "some text (leave it out for the held-out split)"))
    check_file_to_write(args.out, "--out")
    check_checkpoints(("--retro", args.retro, RETRO_KINDS), ("--encoder-lm", args.encoder_lm, LM_KINDS))
    tokenizer, _, heldout = load_prepared(args.data)
    check_tokenizers(tokenizer, ("--retro", args.retro))
    model = load_checkpoint(args.retro, kinds=RETRO_KINDS, flag="--retro").model
    L = model.config.chunk_len
    if args.k and args.k != model.config.n_neighbours:
        raise ValueError(f"--k {args.k}: RETRO retrieves its model's {model.config.n_neighbours} neighbours per "
                         f"chunk ({args.retro} takes no other number; leave --k out)")
    check_flags(*search_checks(retrieval_flags(args), model.config.n_neighbours))
    ids = tokenizer.encode(args.text) if args.text else np.asarray(heldout.tokens[: (args.chunk + 2) * L]).tolist()
    chunks, text = len(ids) // L, "--text" if args.text else f"the held-out split of {args.data}"
    if args.chunk >= chunks:  # before any server starts
        pick = f"pick --chunk in [0, {chunks})" if chunks else "give a longer text"
        raise ValueError(f"--chunk {args.chunk} is past the last whole chunk: {text} holds {chunks} complete "
                         f"chunk{'s' * (chunks != 1)} of {L} tokens ({len(ids)} tokens); {pick}")
    flags = retrieval_flags(args)
    check_datastore_kind(flags, "retro")
    with open_retriever(flags, k=model.config.n_neighbours, security=security_of(args)) as retriever:
        retriever = need_retriever(retriever, flags, "to retrieve neighbours")
        check_datastore_kind(flags, "retro", retriever)
        check_datastore_tokenizer(retriever, tokenizer, flags)
        encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
        plot_retrieved_attention(model, ids, retriever, encoder, tokenizer, args.chunk, args.out)
    print(f"attention of chunk {args.chunk}'s readers -> {args.out}")
