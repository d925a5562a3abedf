"""A local Hugging Face causal LM behind the `TransformerLM` interface, so it can be a kNN-LM base.

`forward(tokens, cache, return_keys)` returns logits and, on request, the kNN-LM keys: the input of
the last transformer layer's feed-forward block (Khandelwal et al. 2020), captured with a forward
pre-hook on that block (`transformer.h[-1].mlp` in GPT-2, `model.layers[-1].mlp` in Llama,
`gpt_neox.layers[-1].mlp` in GPT-NeoX, `model.decoder.layers[-1].fc1` in OPT). Nothing is
downloaded: models load from a local folder with `local_files_only=True`.

Example:
    >>> lm = HFCausalLM.from_pretrained(Path("models/gpt2"))
    >>> logits, keys = lm(tokens, return_keys=True)  # (B, T, V), (B, T, d_model)
    >>> cache = lm.new_cache(); lm(prompt, cache=cache); lm(next_token[:, None], cache=cache)
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm_worker.models.layers import check_length, check_token_ids

log = logging.getLogger(__name__)

FFN_NAMES = ("mlp", "feed_forward", "ffn", "fc1")  # the last block's feed-forward entry, by architecture


@dataclass(frozen=True)
class HFLMConfig:
    """What the LM workers need to know about a Hugging Face causal LM."""

    vocab_size: int
    d_model: int
    max_len: int
    model_type: str
    path: str


class HFCache:
    """Wraps Hugging Face `past_key_values` with the `KVCache` interface: `offset`, `reorder`, `rewind`."""

    def __init__(self):
        self.past: Any = None  # a transformers Cache (or legacy tuples), set by the first forward
        self.offset = 0

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (1-D long tensor), in that order, e.g. the surviving beams."""
        if self.past is None:
            return
        if hasattr(self.past, "reorder_cache"):
            self.past.reorder_cache(indices)
        else:  # legacy tuple of (key, value) per layer
            self.past = tuple(tuple(t.index_select(0, indices.to(t.device)) for t in layer) for layer in self.past)

    def rewind(self, n: int = 1) -> None:
        """Forget the last `n` positions, as if they had never been fed (a rejected speculative step)."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot rewind {n} of {self.offset} cached positions")
        keep = self.offset - n
        if n > 0 and hasattr(self.past, "crop"):
            self.past.crop(-n)  # a negative length removes that many positions (transformers 4 and 5)
        elif n > 0 and self.past is not None:  # legacy tuple of (key, value) per layer, each (B, H, S, D)
            self.past = tuple(tuple(t[:, :, :keep] for t in layer) for layer in self.past)
        self.offset = keep


def find_last_ffn(model: nn.Module, n_layer: int) -> nn.Module:
    """The feed-forward module of the last of the `n_layer` transformer blocks.

    Raises:
        ValueError: no list of `n_layer` blocks, or no feed-forward module named as in `FFN_NAMES`.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layer]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of {n_layer} transformer layers")
    last = lists[0][-1]
    for name in FFN_NAMES:
        module = getattr(last, name, None)
        if isinstance(module, nn.Module):
            return module
    children = [name for name, _ in last.named_children()]
    raise ValueError(f"cannot find the feed-forward block of {type(last).__name__} (children {children}); "
                     f"expected one named {FFN_NAMES}")


def folder_max_len(path: Path) -> int:
    """The longest sequence the Hugging Face model in folder `path` takes, read from its config alone."""
    from transformers import AutoConfig

    return _max_len(AutoConfig.from_pretrained(str(path), local_files_only=True))


def _max_len(cfg) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the maximum length of a {cfg.model_type} model from its config")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with a cache and kNN-LM key capture, shaped like `TransformerLM`."""

    def __init__(self, hf_model: nn.Module, path: str = ""):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        self.config = HFLMConfig(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, max_len=_max_len(cfg),
                                 model_type=cfg.model_type, path=str(path))
        self._ffn = find_last_ffn(hf_model, cfg.num_hidden_layers)
        # transformers 5.x names the cache argument `cache` (and warns on `past_key_values`); 4.x does not
        self._cache_arg = "cache" if "cache" in inspect.signature(type(hf_model).forward).parameters \
            else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: Path, dtype: torch.dtype | None = None) -> HFCausalLM:
        """Loads `AutoModelForCausalLM` from a local folder, offline, in eval mode.

        Args:
            path: a folder written by `save_pretrained` (config.json and weights).
            dtype: the weights' dtype (None: the library's default).

        Raises:
            FileNotFoundError: `path` has no config.json.
            ValueError: the model's last feed-forward block cannot be found.
        """
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        kwargs = {} if dtype is None else {"dtype": dtype}
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
        log.info("loaded %s from %s", type(hf_model).__name__, path)
        return cls(hf_model, str(path)).eval()

    def new_cache(self) -> HFCache:
        """An empty cache for incremental decoding; its batch size is set by the first call."""
        return HFCache()

    def forward(self, tokens: torch.Tensor, cache: HFCache | None = None, return_keys: bool = False,
                on_keys: Callable[[torch.Tensor], None] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (B, T, V) for every position, and with `return_keys` the kNN-LM keys
        (B, T, d_model), exactly as `TransformerLM.forward` (`on_keys` too: called with the keys before the
        last feed-forward block runs); `cache` is an `HFCache` from `new_cache()`."""
        T = tokens.shape[1]
        check_token_ids(tokens, self.config.vocab_size)  # else a bare IndexError, or a device-side assert
        check_length(cache.offset if cache is not None else 0, T, self.config.max_len)
        captured: list[torch.Tensor] = []
        hook = _capture_into(captured, tokens.shape, on_keys)
        handle = self._ffn.register_forward_pre_hook(hook, with_kwargs=True) if return_keys or on_keys else None
        try:
            past = {self._cache_arg: None if cache is None else cache.past}
            out = self.hf(input_ids=tokens, use_cache=cache is not None, **past)
        finally:
            if handle is not None:
                handle.remove()
        if cache is not None:
            cache.past = out["cache"] if "cache" in out else out.past_key_values
            cache.offset += T
        logits = out.logits  # (B, T, V)
        if not return_keys:
            return logits
        if len(captured) != 1:
            raise RuntimeError(f"the last feed-forward block ran {len(captured)} times in one forward pass")
        return logits, captured[0]  # (B, T, V), (B, T, d_model)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of `targets` (B, T) given `tokens` (B, T); `ignore_index` masks targets."""
        logits = self(tokens)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


def _capture_into(captured: list[torch.Tensor], shape: torch.Size,
                  on_keys: Callable[[torch.Tensor], None] | None = None):
    """A forward pre-hook that appends the block's input hidden states, as (*shape, d) (OPT flattens
    B*T), to `captured`, and passes them to `on_keys` when given."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"cannot find the input hidden states of {type(module).__name__}")
        captured.append(x.reshape(*shape, -1))
        if on_keys is not None:
            on_keys(captured[-1])

    return hook


def tokenizer_fingerprint(path: Path) -> str:
    """Fingerprint of a Hugging Face folder's tokenizer.json, as `Tokenizer.fingerprint` computes it where
    that class can load it, else "hf:" + a hash of the file; "" when the folder has no tokenizer.json."""
    from lm_worker.data.tokenizer import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return ""
    try:
        return Tokenizer.load(file).fingerprint
    except ValueError:
        return "hf:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
