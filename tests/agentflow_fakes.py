"""A scripted RolloutEngine for unit tests of the loop logic (the real engine is tested end to end).

`ByteTokenizer` is a byte-level tokenizer with a ChatML template (ids 0..255 are bytes, then
<|im_end|>, <|endoftext|>, <|im_start|>). `ScriptedEngine` answers each prompt with
`reply(role, prompt_text)`, where role is read from the system message (planner, executor,
verifier, generator, judge, base) and records every generate call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.rollout.protocol import Generation, SamplingConfig, SleepReport, SyncReport

IM_END, EOT, IM_START = 256, 257, 258
SPECIAL = {"<|im_end|>": IM_END, "<|endoftext|>": EOT, "<|im_start|>": IM_START}


class ByteTokenizer:
    eos_token_id = IM_END
    pad_token_id = EOT
    unk_token_id = None

    def __len__(self) -> int:
        return 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            for tok, tid in SPECIAL.items():
                if text.startswith(tok, i):
                    out.append(tid)
                    i += len(tok)
                    break
            else:
                out += list(text[i].encode())
                i += 1
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        inv = {v: k for k, v in SPECIAL.items()}
        parts, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
                continue
            parts.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            if not skip_special_tokens:
                parts.append(inv[t])
        parts.append(buf.decode("utf-8", "replace"))
        return "".join(parts)

    def convert_tokens_to_ids(self, tok: str) -> int | None:
        return SPECIAL.get(tok)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False, **kw):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


ROLES = {
    "You are the planner": "planner",
    "You are the query analyst": "analysis",
    "You are the executor": "executor",
    "You are the verifier": "verifier",
    "You are the generator": "generator",
    "You grade answers": "judge",
    "You are a helpful assistant": "base",
}


def role_of(prompt_text: str) -> str:
    for marker, role in ROLES.items():
        if marker in prompt_text:
            return role
    return "unknown"


@dataclass
class Call:
    role: str
    prompts: list[list[int]]
    texts: list[str]
    sampling: SamplingConfig


class ScriptedEngine:
    """`reply(role, prompt_text) -> str`; a reply ending in "<no-eos>" is cut at max_new_tokens instead."""

    def __init__(self, reply: Callable[[str, str], str]) -> None:
        self._tok = ByteTokenizer()
        self.reply = reply
        self.calls: list[Call] = []

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tok

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        texts = [self._tok.decode(p) for p in prompts]
        roles = {role_of(t) for t in texts}
        assert len(roles) == 1, f"one generate call mixed roles {roles}"
        self.calls.append(Call(roles.pop(), [list(p) for p in prompts], texts, sampling))
        out = []
        for p, text in zip(prompts, texts):
            reply = self.reply(role_of(text), text)
            cut = reply.endswith("<no-eos>")
            ids = self._tok.encode(reply.removesuffix("<no-eos>"))
            if cut or len(ids) + 1 > sampling.max_new_tokens:
                ids, finish = (ids + [ord(" ")] * sampling.max_new_tokens)[: sampling.max_new_tokens], "length"
            else:
                ids, finish = [*ids, IM_END], "stop"
            lps = [-0.25 - 0.001 * i for i in range(len(ids))]
            out.append(Generation(list(p), ids, lps, self._tok.decode(ids, skip_special_tokens=True), finish))
        return out

    def calls_of(self, role: str) -> list[Call]:
        return [c for c in self.calls if c.role == role]

    def sleep(self, level: int = 1) -> SleepReport:
        return SleepReport(supported=False, level=level, note="scripted engine holds no memory")

    def wake(self, tags: Sequence[str] | None = None) -> None:
        return None

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        n = len(list(named_tensors))
        return SyncReport(num_tensors=n, num_expected=n, bytes_moved=0, seconds=0.0)

    def stats(self) -> dict[str, float]:
        return {"generate_calls": len(self.calls), "prompts": sum(len(c.prompts) for c in self.calls)}


SEED_STRIDE = 1_000_003


class StreamingScriptedEngine(ScriptedEngine):
    """A deterministic `StreamingLanguageModel`: `reply(role, prompt_text, seed)`; request seeds as in vLLM
    (prompt i of `generate` gets `seed * SEED_STRIDE + i`, a submitted request is prompt 0). A request
    finishes after 1 + (prompt length mod `spread`) `step()` calls, so requests overtake each other."""

    def __init__(self, reply: Callable[[str, str, int | None], str], spread: int = 3) -> None:
        super().__init__(lambda role, text: "")
        self.reply_seeded = reply
        self.spread = spread
        self._next = 0
        self._queue: dict[int, tuple[list[int], SamplingConfig, int]] = {}
        self.max_in_flight = 0
        self.most_roles_in_flight = 0  # the most distinct roles pending at one step()

    def _one(self, prompt: list[int], sampling: SamplingConfig, seed: int | None) -> Generation:
        self.reply = lambda role, text: self.reply_seeded(role, text, seed)
        return ScriptedEngine.generate(self, [prompt], sampling)[0]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        seeds = [None if sampling.seed is None else sampling.seed * SEED_STRIDE + i for i in range(len(prompts))]
        return [self._one(list(p), sampling, s) for p, s in zip(prompts, seeds)]

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> int:
        self._next += 1
        self._queue[self._next] = (list(prompt_ids), sampling, 1 + len(prompt_ids) % self.spread)
        self.max_in_flight = max(self.max_in_flight, len(self._queue))
        return self._next

    def step(self) -> list[tuple[int, Generation]]:
        roles = {role_of(self._tok.decode(p)) for p, _, _ in self._queue.values()}
        self.most_roles_in_flight = max(self.most_roles_in_flight, len(roles))
        done = []
        for rid, (p, s, left) in list(self._queue.items()):
            if left > 1:
                self._queue[rid] = (p, s, left - 1)
                continue
            del self._queue[rid]
            done.append((rid, self._one(p, s, None if s.seed is None else s.seed * SEED_STRIDE)))
        return done

    def num_pending(self) -> int:
        return len(self._queue)
