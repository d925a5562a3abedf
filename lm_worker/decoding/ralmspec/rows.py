"""What speculative decoding (kNN-LM, RETRO) has committed per row: tokens, summed log-probs, the rows
that have finished (EOS) or reached `max_new_tokens`."""

from __future__ import annotations

import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput


class CommittedRows:
    """What decoding has committed per row: tokens, summed log-probs, finished rows."""

    def __init__(self, B: int, config: GenerateConfig):
        self.config = config
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.total = torch.zeros(B, dtype=torch.float32)
        self.finished = [False] * B

    def commit(self, row: int, token: int, log_prob: float) -> None:
        self.tokens[row].append(token)
        self.total[row] += log_prob
        if self.config.eos_id is not None and token == self.config.eos_id:
            self.finished[row] = True

    def commit_many(self, rows: list[int], tokens: list[int], log_probs: list[float]) -> None:
        for row, token in zip(rows, tokens):
            self.tokens[row].append(token)
            if self.config.eos_id is not None and token == self.config.eos_id:
                self.finished[row] = True
        self.total[rows] += torch.tensor(log_probs, dtype=self.total.dtype)

    def roll_back(self, row: int, length: int, total: torch.Tensor) -> None:
        """The row keeps its first `length` tokens, whose summed log-prob was `total` (a 0-d tensor)."""
        del self.tokens[row][length:]
        self.total[row] = total
        self.finished[row] = self.config.eos_id is not None and self.config.eos_id in self.tokens[row]

    def done(self, row: int) -> bool:
        return self.finished[row] or len(self.tokens[row]) >= self.config.max_new_tokens

    def output(self, device: torch.device) -> GenerateOutput:
        """What was committed, on `device` (the prompt's, as the serial decoders answer)."""
        width = max(len(t) for t in self.tokens)
        pad = self.config.eos_id if self.config.eos_id is not None else 0
        tokens = torch.tensor([t + [pad] * (width - len(t)) for t in self.tokens], dtype=torch.long)
        lengths = torch.tensor([len(t) for t in self.tokens], dtype=torch.long)
        total = self.total.to(device, copy=True)
        return GenerateOutput(tokens.to(device), total, lengths.to(device), total.clone())
