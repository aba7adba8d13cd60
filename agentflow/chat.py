"""Prompt rendering through the engine's tokenizer: chat template → exact prompt token ids."""

from __future__ import annotations

from typing import Any


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """`apply_chat_template(messages, add_generation_prompt=True)` as a plain list of token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding regardless
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """The end-of-turn ids: the tokenizer's EOS and `<|im_end|>` when the vocabulary has it."""
    out = []
    if tokenizer.eos_token_id is not None:
        out.append(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None) and im_end not in out:
        out.append(im_end)
    if not out:
        raise ValueError(
            "the tokenizer has no EOS token and no <|im_end|>; set tokenizer.eos_token so generation can stop"
        )
    return tuple(out)
