"""Greedy decoding on a static KV cache, for inference speed with the same tokens (DESIGN.md §6).

Prefill runs once with ``inputs_embeds`` (the image tokens come as embeddings); every further token is one call of
:meth:`GreedyDecoder._step` on a pre-allocated transformers ``StaticCache``: fixed shapes and fixed addresses, so
that on CUDA ``torch.compile(mode="reduce-overhead")`` can capture the step in a CUDA graph. The last-layer state of
every step whose *input* is ``[SEG]`` is kept (the training rule), so a segmentation needs no second pass over the
answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StaticCache

from ..errors import InputError, raise_if_cancelled

__all__ = ["Decoded", "GreedyDecoder", "plain_greedy"]

# GenerationConfig fields that make transformers' greedy search deviate from a plain argmax (its logits processors).
# A language model whose generation config sets any of them differently from the defaults decodes through
# transformers instead (e.g. a Qwen2.5-Instruct folder's repetition_penalty of 1.05).
_PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                     "sequence_bias", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                     "begin_suppress_tokens", "exponential_decay_length_penalty", "guidance_scale",
                     "remove_invalid_values", "renormalize_logits")  # fmt: skip
# The cache grows in steps of this many positions, so that prompts of similar length reuse one cache (and, compiled,
# one captured graph).
CACHE_STEP = 256


def plain_greedy(config: GenerationConfig) -> bool:
    """Whether transformers' greedy search with this generation config is a plain argmax per token."""
    default = GenerationConfig()
    return all(getattr(config, name, None) == getattr(default, name, None) for name in _PROCESSOR_FIELDS)


@dataclass
class Decoded:
    """Generated ids (ending at the end token when generation stopped there) and ``seg_states`` ``(n, d)``: the
    last-layer hidden state of each ``[SEG]`` in ``ids``, read at the step whose input token it is."""

    ids: list[int]
    seg_states: torch.Tensor


class GreedyDecoder:
    """Greedy decoding of one sequence through a causal LM (a peft-wrapped ``Qwen2ForCausalLM``, LoRA merged or not).

    One decoder serves one model: its cache is reused across calls (a lock keeps calls from other threads apart) and
    grows when a longer one comes. ``compile`` (CUDA only) compiles the decode step with
    ``torch.compile(mode="reduce-overhead")``; elsewhere the step runs eagerly. Copies and pickles of a decoder start
    without cache and compiled step.
    """

    def __init__(self, llm: Any, *, compile: bool = False) -> None:  # noqa: A002
        self.base = llm.get_base_model()  # Qwen2ForCausalLM: .model the decoder stack, .lm_head the output head
        self.compile = compile
        self.cache: StaticCache | None = None
        self._compiled: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cache": None, "_compiled": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _cache_for(self, length: int, embeds: torch.Tensor) -> StaticCache:
        """A reset cache of at least ``length`` positions for ``embeds``' device and dtype."""
        cache = self.cache
        layer = cache.layers[0] if cache is not None else None
        fits = layer is not None and layer.max_cache_len >= length and layer.is_initialized
        if fits and layer.keys.device == embeds.device and layer.keys.dtype == embeds.dtype:
            cache.reset()
            return cache
        size = -(-length // CACHE_STEP) * CACHE_STEP
        self.cache = StaticCache(config=self.base.config, max_cache_len=size)
        return self.cache

    def _step(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: the ``(1, 1)`` input token → its last-layer state ``(1, d)``, the next token ``(1, 1)``."""
        hidden = self.base.model(input_ids=token, cache=self.cache, use_cache=True).last_hidden_state[:, -1]
        return hidden, self.base.lm_head(hidden).argmax(dim=-1, keepdim=True)

    def _stepper(self, device: torch.device) -> Any:
        if not (self.compile and device.type == "cuda"):
            return self._step
        if self._compiled is None:
            self._compiled = torch.compile(self._step, mode="reduce-overhead")
        return self._compiled

    def decode(
        self, embeds: torch.Tensor, *, max_new_tokens: int, end_id: int, seg_id: int, streamer: Any = None,
        cancel: threading.Event | None = None,
    ) -> Decoded:  # fmt: skip
        """Greedy tokens after the prompt ``embeds`` ``(1, L, d)``, up to ``max_new_tokens`` or ``end_id`` (kept).

        ``streamer`` follows transformers' protocol without the prompt: ``put`` gets each new token as a ``(1,)``
        tensor, ``end`` is called once generation is complete. ``cancel`` is checked before the prefill and after
        every token, before the streamer sees it, as transformers' stopping criteria are. A ``[SEG]`` generated as
        the last token (at ``max_new_tokens``) is fed once more to read its state.

        Raises:
            Cancelled: ``cancel`` was set.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        raise_if_cancelled(cancel, "the generation")
        with self._lock:
            self._cache_for(embeds.shape[1] + max_new_tokens, embeds)
            step = self._stepper(embeds.device)
            hidden = self.base.model(inputs_embeds=embeds, cache=self.cache, use_cache=True).last_hidden_state[:, -1]
            token = self.base.lm_head(hidden).argmax(dim=-1, keepdim=True)
            ids: list[int] = []
            states: list[torch.Tensor] = []
            while True:
                value = int(token)
                ids.append(value)
                raise_if_cancelled(cancel, "the generation")
                if streamer is not None:
                    streamer.put(token[0].cpu())
                if value == end_id:
                    break
                last = len(ids) == max_new_tokens
                if last and value != seg_id:
                    break
                hidden, token = step(token.clone())
                if value == seg_id:
                    states.append(hidden.clone())  # a captured graph overwrites its outputs on the next replay
                if last:
                    break
            if streamer is not None:
                streamer.end()
        seg_states = torch.cat(states) if states else hidden.new_zeros((0, hidden.shape[-1]))
        return Decoded(ids, seg_states)
