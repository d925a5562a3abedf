"""Decoding: the cache against cache-free forwards, greedy against argmax, filters against sorted
references, beam search against greedy and exhaustive search, EOS and length normalisation, per-row
samplers, and pipelined prompt groups against serial decoding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import Recorder

from lm_worker.decoding.beam import length_normaliser
from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import decode_loop, drive, generate
from lm_worker.decoding.lm_stepper import LMStepper
from lm_worker.decoding.pipelined import generate_pipelined, split_groups
from lm_worker.decoding.sampling import apply_temperature, top_k_filter, top_p_filter
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

V, B, T = 16, 3, 5


def tiny_lm(vocab: int, seed: int = 0, sharpen: float = 6.0) -> TransformerLM:
    """A random tiny LM whose next-token distributions are far from uniform (scaled embeddings)."""
    torch.manual_seed(seed)
    model = TransformerLM(LMConfig.tiny(vocab_size=vocab)).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return tiny_lm(V)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


class TableStepper:
    """A scripted model: log-probs are a function table(prompt row, generated tokens) -> probabilities (V,).
    Rows remember which prompt they came from through reorders (beams)."""

    def __init__(self, table):
        self.table, self.rows, self.origin, self.steps = table, [], [], 0

    def _out(self):
        return torch.stack([torch.as_tensor(self.table(o, tuple(r)), dtype=torch.float64).log().float()
                            for o, r in zip(self.origin, self.rows)])

    def start(self, prompt):
        self.rows, self.origin = [[] for _ in range(len(prompt))], list(range(len(prompt)))
        return self._out()

    def step(self, tokens):
        self.steps += 1
        self.rows = [r + [int(t)] for r, t in zip(self.rows, tokens)]
        return self._out()

    def reorder(self, indices):
        self.rows = [list(self.rows[i]) for i in indices.tolist()]
        self.origin = [self.origin[i] for i in indices.tolist()]


class KeyedTable(TableStepper):
    """A TableStepper whose rows are keyed by their prompt's first token, not their place in the batch;
    `fork` gives an independent copy, and `pipelined` asks `generate` to use forks."""

    def __init__(self, table, pipelined: bool = False):
        super().__init__(table)
        self.pipelined, self.forks = pipelined, []

    def start(self, prompt):
        self.rows, self.origin = [[] for _ in range(len(prompt))], prompt[:, 0].tolist()
        return self._out()

    def fork(self):
        self.forks.append(KeyedTable(self.table))
        return self.forks[-1]


def random_table(vocab: int, seed: int, scale: float = 1.5):
    """Seeded random next-token probabilities for every (prompt row, generated tokens)."""
    def table(origin: int, gen: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, origin, *gen)) % (2 ** 31))
        return torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * scale, -1)

    return table


def table_log_prob(table, origin: int, seq: list[int]) -> float:
    return sum(math.log(table(origin, tuple(seq[:i]))[t]) for i, t in enumerate(seq))


def full_log_probs(model, seq: torch.Tensor) -> torch.Tensor:
    """Reference: cache-free forward over the whole sequence, last position, float64 softmax."""
    return torch.log_softmax(model(seq)[:, -1].double(), dim=-1)


def sequence_log_prob(model, prompt: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Summed log-prob (N,) of each continuation (N, n) after its prompt (N, T), cache-free."""
    seq = torch.cat([prompt, continuation], dim=1)
    lp = torch.log_softmax(model(seq).double(), dim=-1)[:, prompt.shape[1] - 1:-1]  # (N, n, V)
    return lp.gather(2, continuation[..., None]).squeeze(-1).sum(1)


@torch.no_grad()
def test_lm_stepper_matches_cache_free_forward_every_step(model, prompt):
    stepper = LMStepper(model)
    seq = prompt.clone()
    out = stepper.start(seq)
    for t in range(8):
        torch.testing.assert_close(out.double(), full_log_probs(model, seq), atol=1e-5, rtol=0)
        if t == 3:  # a beam-style reorder midway: rows dropped and duplicated
            idx = torch.tensor([2, 0, 0])
            stepper.reorder(idx)
            seq = seq[idx]
        nxt = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(t))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        out = stepper.step(nxt)


@torch.no_grad()
def test_greedy_equals_cache_free_argmax_path(model, prompt):
    out = generate(LMStepper(model), prompt, GenerateConfig(strategy="greedy", max_new_tokens=10))
    seq, total = prompt.clone(), torch.zeros(B, dtype=torch.float64)
    for _ in range(10):
        lp = full_log_probs(model, seq)
        nxt = lp.argmax(-1)
        total += lp.gather(1, nxt[:, None]).squeeze(1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out.tokens, seq[:, T:])
    torch.testing.assert_close(out.log_probs.double(), total, atol=1e-4, rtol=0)
    assert out.lengths.tolist() == [10] * B


def test_top_k_filter_keeps_exactly_the_top_k_without_ties():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        lp = torch.log_softmax(torch.randn(4, V, generator=g) * 2, -1)
        k = 1 + seed % 6
        out = top_k_filter(lp, k)
        kept = torch.isfinite(out)
        assert kept.sum(-1).tolist() == [k] * 4
        top = lp.topk(k, -1).indices
        assert kept.gather(1, top).all()
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
        torch.testing.assert_close(out[kept], (lp - lp.gather(1, top).logsumexp(-1, keepdim=True))[kept])


def test_top_k_keeps_every_token_tied_with_the_kth():
    """As Hugging Face's top-k: a tie at the k-th place keeps all its tokens, whichever `topk` lists first."""
    lp = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 0.0], [3.0, 2.0, 1.0, 1.0]]), -1)
    kept = torch.isfinite(top_k_filter(lp, 2))
    assert kept.tolist() == [[True] * 4, [True, True, True, False], [True, True, False, False]]


def test_top_k_sampling_never_leaves_the_top_k():
    k, table = 3, random_table(V, seed=11, scale=0.5)
    for seed in range(25):
        rec = Recorder(TableStepper(table))
        out = generate(rec, torch.zeros(4, 1, dtype=torch.long),
                       GenerateConfig(strategy="sample", top_k=k, max_new_tokens=6, seed=seed))
        for t, lp in enumerate(rec.outputs[:out.tokens.shape[1]]):
            top = lp.topk(k, -1).indices  # (B, k)
            assert (top == out.tokens[:, t:t + 1]).any(-1).all(), f"seed {seed} step {t}"


def sorted_top_p_reference(probs: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches p, by a plain loop."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_filter_keeps_the_smallest_set_reaching_p(p):
    g = torch.Generator().manual_seed(int(p * 100))
    lp = torch.log_softmax(torch.randn(8, V, generator=g, dtype=torch.float64) * 1.5, -1)
    out = top_p_filter(lp, p)
    for row in range(8):
        probs = lp[row].exp().tolist()
        expected = sorted_top_p_reference(probs, p)
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert kept == expected
        mass = sum(probs[i] for i in kept)
        for i in kept:
            assert out[row, i].exp().item() == pytest.approx(probs[i] / mass, rel=1e-9)
    assert torch.equal(top_p_filter(lp, 1.0), lp)


@pytest.mark.parametrize("p,kept", [(0.5, [0]), (0.75, [0, 1]), (0.76, [0, 1, 2]), (0.875, [0, 1, 2])])
def test_top_p_stops_as_soon_as_the_mass_reaches_p_exactly(p, kept):
    lp = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()  # exact in binary: sums are exact too
    assert torch.isfinite(top_p_filter(lp, p))[0].nonzero().flatten().tolist() == kept


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_top_p_of_equal_tokens_keeps_the_count_that_reaches_p(p):
    """Ten tokens of 0.1 (not exact in binary, and float32): p = 0.3 keeps three, as the sum of three
    reaches it; a float32 sum, or log-probs rounded below 0.1, kept a fourth. A tiny p keeps the best."""
    for lp in (torch.full((2, 10), 0.1).log(), torch.full((2, 10), 0.1, dtype=torch.float64).log(),
               torch.log_softmax(torch.zeros(2, 10), -1)):
        assert torch.isfinite(top_p_filter(lp, p)).sum(-1).tolist() == [round(p * 10)] * 2
    assert torch.isfinite(top_p_filter(torch.log_softmax(torch.arange(5.0), -1), 1e-9)).nonzero().tolist() == [[4]]


@pytest.mark.parametrize("temperature", [1.0, 1.000001])
def test_top_p_measures_mass_within_the_row_whose_total_is_not_one(temperature):
    """A kNN-LM row whose search found no neighbour holds 1 - λ of mass. At temperature 1 (no rescaling)
    top-p measured it against p as it was, so a p above 1 - λ kept every token; at any other temperature
    the row was renormalised first. The nucleus is now the same on both sides of 1."""
    from lm_worker.decoding.config import GenerateConfig
    from lm_worker.decoding.sampling import filter_log_probs

    normal = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    config = GenerateConfig(strategy="sample", temperature=temperature, top_k=0, top_p=0.9)
    kept = torch.isfinite(filter_log_probs((0.75 * normal).log(), config))  # λ = 0.25, no neighbours
    assert kept.tolist() == torch.isfinite(filter_log_probs(normal.log(), config)).tolist() == \
        [[True, True, True, False, False]]


def test_top_p_keeps_the_lower_ids_of_tokens_tied_at_the_cut():
    """Which of two tied tokens a sort puts first differs between devices: the lower id is kept, always."""
    kept = torch.isfinite(top_p_filter(torch.tensor([[0.3, 0.4, 0.3], [0.3, 0.3, 0.4]]).log(), 0.5))
    assert kept.tolist() == [[True, True, False], [True, False, True]]
    forty = torch.isfinite(top_p_filter(torch.full((1, 40), 1 / 40).log(), 0.25))  # from 17 ties on, an
    assert forty.nonzero()[:, 1].tolist() == list(range(10))  # unstable CPU sort reorders them too


def test_temperature_matches_reference():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    for temp in (0.1, 0.5, 1.0, 2.0, 7.0):
        got = apply_temperature(torch.log_softmax(logits, -1), temp)
        torch.testing.assert_close(got, torch.log_softmax(logits / temp, -1), atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)
    ruled_out = torch.log_softmax(torch.tensor([[2.0, 1.0, -math.inf, 0.5]]), -1)
    for temp in (1e-300, 1e-40, 1e300):  # past float32's range either way: greedy, or uniform over the rest
        got = apply_temperature(ruled_out, temp)
        assert not got.isnan().any() and torch.isneginf(got[0, 2]), (temp, got)
    assert apply_temperature(ruled_out, 1e300)[0, [0, 1, 3]].exp().tolist() == pytest.approx([1 / 3] * 3)


@torch.no_grad()
def test_low_temperature_sampling_approaches_greedy(model, prompt):
    greedy = generate(LMStepper(model), prompt, GenerateConfig(max_new_tokens=8))
    for seed, temperature in zip(range(5), (1e-4, 1e-4, 1e-30, 1e-40, 1e-300)):  # past float32's range too
        cold = generate(LMStepper(model), prompt,
                        GenerateConfig(strategy="sample", temperature=temperature, max_new_tokens=8, seed=seed))
        assert torch.equal(cold.tokens, greedy.tokens)


def test_sampling_is_reproducible_with_a_seed():
    table = random_table(V, seed=12, scale=0.5)

    def sample(seed: int) -> torch.Tensor:
        cfg = GenerateConfig(strategy="sample", top_p=0.95, max_new_tokens=12, seed=seed)
        return generate(TableStepper(table), torch.zeros(3, 1, dtype=torch.long), cfg).tokens

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@torch.no_grad()
@pytest.mark.parametrize("eos", [None, 2])
def test_beam_of_width_one_is_greedy(model, prompt, eos):
    greedy = generate(LMStepper(model), prompt, GenerateConfig(max_new_tokens=9, eos_id=eos))
    beam = generate(LMStepper(model), prompt, GenerateConfig(strategy="beam", num_beams=1, max_new_tokens=9,
                                                             length_penalty=0.0, eos_id=eos))
    assert torch.equal(beam.tokens, greedy.tokens)
    torch.testing.assert_close(beam.log_probs, greedy.log_probs, atol=1e-5, rtol=0)


def test_beam_of_width_one_is_greedy_on_random_tables():
    table = random_table(5, seed=13)
    cfg = dict(max_new_tokens=8, eos_id=4, length_penalty=0.0)
    greedy = generate(TableStepper(table), torch.zeros(6, 1, dtype=torch.long), GenerateConfig(**cfg))
    beam = generate(TableStepper(table), torch.zeros(6, 1, dtype=torch.long),
                    GenerateConfig(strategy="beam", num_beams=1, **cfg))
    assert torch.equal(beam.tokens, greedy.tokens)
    assert greedy.lengths.min() < greedy.lengths.max() == 8  # rows end at different steps: EOS is exercised


@torch.no_grad()
def test_beam_scores_at_least_greedy_and_match_the_model(model, prompt):
    table = random_table(V, seed=14)
    cfg = GenerateConfig(strategy="beam", num_beams=4, max_new_tokens=6, length_penalty=0.0)
    beam = generate(TableStepper(table), torch.zeros(8, 1, dtype=torch.long), cfg)
    greedy = generate(TableStepper(table), torch.zeros(8, 1, dtype=torch.long), GenerateConfig(max_new_tokens=6))
    # Beam search can in principle prune the greedy path; on these seeded tables it must not, and it must win somewhere.
    assert (beam.log_probs >= greedy.log_probs - 1e-5).all() and (beam.log_probs > greedy.log_probs + 1e-3).any()
    for b in range(8):
        assert beam.log_probs[b].item() == pytest.approx(table_log_prob(table, b, beam.tokens[b].tolist()), abs=1e-4)
    lm_beam = generate(LMStepper(model), prompt, cfg)  # with the LM and its cache: scores are the model's
    torch.testing.assert_close(lm_beam.log_probs.double(), sequence_log_prob(model, prompt, lm_beam.tokens),
                               atol=1e-4, rtol=0)


@torch.no_grad()
def test_beam_search_equals_exhaustive_search_on_an_lm_without_eos():
    vocab, n = 4, 3
    lm = tiny_lm(vocab, seed=4, sharpen=1.0)
    prompts = torch.tensor([[0, 1, 2], [3, 3, 1]])
    beam = generate(LMStepper(lm), prompts, GenerateConfig(strategy="beam", num_beams=vocab ** (n - 1),
                                                           max_new_tokens=n, length_penalty=0.0))
    every = torch.tensor(list(itertools.product(range(vocab), repeat=n)))  # (V^n, n)
    for b in range(2):
        scores = sequence_log_prob(lm, prompts[b:b + 1].expand(len(every), -1), every)
        assert torch.equal(beam.tokens[b], every[scores.argmax()])
        assert beam.log_probs[b].item() == pytest.approx(scores.max().item(), abs=1e-4)


def exhaustive_best(table, origin: int, vocab: int, n: int, eos: int, alpha: float, norm: str):
    """Best normalised score over every hypothesis: up to n tokens, EOS only last (required below n)."""
    best, best_seq = -math.inf, None
    for length in range(1, n + 1):
        for body in itertools.product([v for v in range(vocab) if v != eos], repeat=length - 1):
            for last in ([eos] if length < n else range(vocab)):
                seq = [*body, last]
                score = table_log_prob(table, origin, seq) / length_normaliser(length, alpha, norm)
                if score > best:
                    best, best_seq = score, seq
    return best, best_seq


@pytest.mark.parametrize("alpha,norm", [(0.0, "gnmt"), (1.0, "gnmt"), (0.7, "power"), (-0.5, "power")])
def test_beam_search_equals_exhaustive_search_with_eos_and_length_norm(alpha, norm):
    vocab, n, eos, rows = 4, 4, 3, 6
    table = random_table(vocab, seed=15, scale=1.0)
    # Exact once every candidate of a step before the last fits in the beam: W >= V * (V - 1) ** (n - 2).
    cfg = GenerateConfig(strategy="beam", num_beams=vocab * (vocab - 1) ** (n - 2), max_new_tokens=n, eos_id=eos,
                         length_penalty=alpha, length_norm=norm)
    beam = generate(TableStepper(table), torch.zeros(rows, 1, dtype=torch.long), cfg)
    lengths = set()
    for b in range(rows):
        best, best_seq = exhaustive_best(table, b, vocab, n, eos, alpha, norm)
        length = len(best_seq)
        lengths.add(length)
        assert beam.tokens[b, :length].tolist() == best_seq
        assert beam.tokens[b, length:].eq(eos).all() and beam.lengths[b].item() == length
        assert beam.scores[b].item() == pytest.approx(best, abs=1e-5)
    assert len(lengths) > 1  # hypotheses of several lengths win: EOS handling is exercised


def test_length_normalisers_are_as_documented():
    assert length_normaliser(4, 1.0, "gnmt") == pytest.approx(1.5)
    assert length_normaliser(7, 0.6, "gnmt") == pytest.approx(2.0 ** 0.6)
    assert length_normaliser(4, 0.5, "power") == pytest.approx(2.0)
    assert length_normaliser(9, 0.7, "none") == 1.0 and length_normaliser(9, 0.0, "gnmt") == 1.0


EOS3 = 2  # vocabulary {0, 1, EOS=2}


def short_or_long(_row: int, gen: tuple[int, ...]) -> list[float]:
    """[EOS] costs -0.9; [0, 0, 0, EOS] costs about -1.15 raw but wins once normalised by length."""
    table = {(): [0.55, 1 - 0.55 - math.exp(-0.9), math.exp(-0.9)], (0,): [0.85, 0.10, 0.05],
             (0, 0): [0.85, 0.10, 0.05], (0, 0, 0): [0.1, 0.1, 0.8]}
    return table.get(gen, [0.2, 0.1, 0.7])


@pytest.mark.parametrize("alpha,norm,expected", [
    (0.0, "gnmt", [EOS3]),
    (1.0, "gnmt", [0, 0, 0, EOS3]),
    (1.0, "power", [0, 0, 0, EOS3]),
])
def test_length_penalty_picks_the_documented_hypothesis(alpha, norm, expected):
    cfg = GenerateConfig(strategy="beam", num_beams=2, max_new_tokens=4, eos_id=EOS3, length_penalty=alpha,
                         length_norm=norm)
    out = generate(TableStepper(short_or_long), torch.zeros(1, 1, dtype=torch.long), cfg)
    assert out.tokens[0, :len(expected)].tolist() == expected
    raw = sum(math.log(short_or_long(0, tuple(expected[:i]))[t]) for i, t in enumerate(expected))
    assert out.log_probs.item() == pytest.approx(raw, abs=1e-5)
    assert out.scores.item() == pytest.approx(raw / length_normaliser(len(expected), alpha, norm), abs=1e-5)


def test_beam_search_stops_once_no_live_beam_can_win():
    # width 2, alpha 0: [EOS] (-0.9) finishes at step 1 and [0, 0, 0, EOS] (-1.15) at step 4; the best live
    # beam then has -3.2, so search ends after 4 tokens although max_new_tokens is 10.
    stepper = TableStepper(short_or_long)
    cfg = GenerateConfig(strategy="beam", num_beams=2, max_new_tokens=10, eos_id=EOS3, length_penalty=0.0)
    out = generate(stepper, torch.zeros(1, 1, dtype=torch.long), cfg)
    assert out.tokens.tolist() == [[EOS3]]
    assert stepper.steps == 3


def test_beam_search_does_not_stop_while_a_longer_hypothesis_can_still_win():
    # width 1, GNMT alpha 1: [EOS] (-0.69) finishes first; the live [0] (-0.92) cannot beat it at length 2
    # (-0.92 / (7/6) = -0.79) but could by length 6 (-0.92 / (11/6) = -0.50), and [0, 0, 0, 0, EOS]
    # (-1.00 / (10/6) = -0.60) does.
    def table(_row: int, gen: tuple[int, ...]) -> list[float]:
        if gen == ():
            return [0.4, 0.1, 0.5]
        if gen in {(0,), (0, 0), (0, 0, 0)}:
            return [0.98, 0.01, 0.01]
        return [0.01, 0.01, 0.98] if gen == (0, 0, 0, 0) else [0.3, 0.3, 0.4]

    stepper = TableStepper(table)
    cfg = GenerateConfig(strategy="beam", num_beams=1, max_new_tokens=6, eos_id=EOS3, length_penalty=1.0)
    out = generate(stepper, torch.zeros(1, 1, dtype=torch.long), cfg)
    assert out.tokens.tolist() == [[0, 0, 0, 0, EOS3]]
    assert out.scores.item() == pytest.approx((math.log(0.4) + 3 * math.log(0.98) + math.log(0.98)) / (10 / 6))
    assert stepper.steps == 4  # and it stops right after, one token short of max_new_tokens


def test_greedy_pads_finished_rows_with_eos_and_stops_when_all_finished():
    def table(row: int, gen: tuple[int, ...]) -> list[float]:
        return [0.1, 0.2, 0.7] if len(gen) >= row + 1 else [0.6, 0.3, 0.1]  # row r emits EOS at step r + 2

    stepper = TableStepper(table)
    out = generate(stepper, torch.zeros(3, 2, dtype=torch.long), GenerateConfig(max_new_tokens=10, eos_id=EOS3))
    assert out.tokens.tolist() == [[0, EOS3, EOS3, EOS3], [0, 0, EOS3, EOS3], [0, 0, 0, EOS3]]
    assert out.lengths.tolist() == [2, 3, 4]
    assert stepper.steps == 3  # no step after the last row finished
    expected = [math.log(0.6) * r + math.log(0.7) for r in (1, 2, 3)]
    torch.testing.assert_close(out.log_probs, torch.tensor(expected), atol=1e-5, rtol=0)


def test_config_rejects_bad_values():
    for bad in (dict(strategy="nucleus"), dict(temperature=0.0), dict(top_p=0.0), dict(num_beams=0),
                dict(length_norm="hf"), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            GenerateConfig(**bad)
    for bad, words in ((dict(top_k=-3), "top_k must be >= 0, got -3"), (dict(max_new_tokens=0), "max_new_tokens must"
                       " be >= 1, got 0"), (dict(temperature=0.0), "temperature must be > 0 and finite, got 0.0"),
                       (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5")):
        with pytest.raises(ValueError, match=words):  # the value at fault, by its name
            GenerateConfig(**bad)
    for name, value in (("top_k", 2.5), ("top_k", True), ("max_new_tokens", 3.5), ("num_beams", 2.0), ("seed", 1.5),
                        ("eos_id", 1.0)):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer, got {value!r}$"):
            GenerateConfig(**{name: value})  # each failed a step or more later, in torch, with a bare TypeError
    with pytest.raises(ValueError, match="eos_id must be >= 0, got -1"):
        GenerateConfig(eos_id=-1)
    with pytest.raises(ValueError, match="rows must be distinct row indices >= 0"):
        GenerateConfig(rows=(0, 1.5))
    assert GenerateConfig(eos_id=np.int64(3), max_new_tokens=np.int32(4)).eos_id == 3
    with pytest.raises(ValueError):
        generate(TableStepper(short_or_long), torch.zeros(0, 3, dtype=torch.long))


def test_a_prompt_of_other_than_the_models_token_ids_is_refused_before_any_step(model):
    stepper = LMStepper(model)
    for prompt, words in ((torch.tensor([[5, V]]), rf"token id {V}, outside the model's vocabulary \[0, {V}\)"),
                          (torch.tensor([[-1, 5]]), "token id -1"),
                          (torch.tensor([[5.9, 3.0]]), "integer token ids, got dtype torch.float32")):
        with pytest.raises(ValueError, match=words):
            generate(stepper, prompt, GenerateConfig(max_new_tokens=2))
    edge = torch.tensor([[5, V - 1]], dtype=torch.int32)  # the last id of the vocabulary, any integer dtype
    assert generate(stepper, edge, GenerateConfig(max_new_tokens=2)).tokens.shape == (1, 2)


def test_a_row_samples_the_same_tokens_alone_or_in_a_batch():
    table = random_table(V, seed=17, scale=0.5)
    prompt = torch.arange(4)[:, None]
    cfg = GenerateConfig(strategy="sample", top_k=8, max_new_tokens=8, seed=5)
    batch = generate(KeyedTable(table), prompt, cfg).tokens
    for r in range(4):  # row r alone, seeded as row r of the batch
        alone = drive([decode_loop(KeyedTable(table), prompt[r:r + 1], cfg, first_row=r)])[0].tokens
        assert torch.equal(alone[0], batch[r])
    same = generate(KeyedTable(table), torch.zeros(4, 1, dtype=torch.long), cfg).tokens  # one distribution
    assert len({tuple(row) for row in same.tolist()}) > 1  # drawn by four different generators


def test_split_groups_covers_the_rows_in_near_equal_groups():
    assert split_groups(5) == [(0, 2), (2, 5)] and split_groups(1) == [(0, 1)]
    assert split_groups(7, 3) == [(0, 2), (2, 4), (4, 7)] and split_groups(2, 5) == [(0, 1), (1, 2)]


PIPELINED = {
    "greedy": GenerateConfig(max_new_tokens=8, eos_id=4),
    "sample": GenerateConfig(strategy="sample", top_p=0.9, max_new_tokens=8, eos_id=4, seed=2),
    "beam": GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=8, eos_id=4),
}


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("name", list(PIPELINED))
def test_pipelined_groups_decode_what_serial_decodes(name, groups):
    table, cfg, prompt = random_table(5, seed=30), PIPELINED[name], torch.arange(7)[:, None]
    serial = generate(KeyedTable(table), prompt, cfg)
    stepper = KeyedTable(table)
    piped = generate_pipelined(stepper, prompt, cfg, groups=groups)
    assert torch.equal(serial.tokens, piped.tokens) and torch.equal(serial.lengths, piped.lengths)
    torch.testing.assert_close(serial.log_probs, piped.log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(serial.scores, piped.scores, atol=1e-6, rtol=0)
    assert len(stepper.forks) == groups and stepper.rows == []  # the forks decoded; the stepper is untouched
    steps = [f.steps for f in stepper.forks]
    assert len(set(steps)) > 1  # groups finished after different numbers of steps: outputs were padded
    for fork, (lo, hi) in zip(stepper.forks, split_groups(7, groups)):
        assert set(fork.origin) == set(range(lo, hi))  # every row (beams too) stayed with its group's prompts


def test_generate_pipelines_a_stepper_that_asks_for_it():
    table, prompt = random_table(5, seed=18), torch.arange(4)[:, None]
    plain, asks = KeyedTable(table), KeyedTable(table, pipelined=True)
    assert torch.equal(generate(plain, prompt).tokens, generate(asks, prompt).tokens)
    assert plain.forks == [] and len(asks.forks) == 2
    generate(asks, prompt[:1])  # one prompt: nothing to overlap with, decoded serially
    assert len(asks.forks) == 2
