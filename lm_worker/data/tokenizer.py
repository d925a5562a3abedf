"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved with its fingerprint.

Byte-level BPE never meets an unknown character, keeps whitespace (code's indentation survives a
round trip), and is what GPT-2-style LMs use. The fingerprint is a hash of the saved JSON: a
datastore records it, and a worker refuses a datastore built with another tokenizer.

Example:
    >>> tok = train_tokenizer(texts, vocab_size=4096)
    >>> tok.save(Path("run/tokenizer.json"))
    >>> Tokenizer.load(Path("run/tokenizer.json")).encode("def f(x):\\n    return x")
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


class Tokenizer:
    """Text to token ids and back; `eos_id` ends every document."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        eos = self._tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS} token")
        self.eos_id: int = eos
        self.vocab_size: int = self._tok.get_vocab_size()
        self.fingerprint: str = "bpe:" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]
        self._tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a text is text, not EOS

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOS appended; EOS's own text in it is encoded as plain text)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, tokenized in parallel."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; EOS is kept so document boundaries stay visible."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        """Writes the tokenizer as one JSON file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Reads a tokenizer saved by `save`.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: the file is not a tokenizer with an EOS token.
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises its own exception type
            raise ValueError(f"{path} is not a tokenizer file: {err}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Trains a byte-level BPE tokenizer with `vocab_size` tokens (EOS included) on `texts`. The trainer
    draws no progress bars: `tokenizers` draws them on stdout, which is a command's output."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size {vocab_size} must exceed the 256 byte tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    log.info("training a BPE tokenizer of %d tokens", vocab_size)
    tok.train_from_iterator(texts, trainer)
    log.info("trained a BPE tokenizer with %d tokens", tok.get_vocab_size())
    return Tokenizer(tok)
