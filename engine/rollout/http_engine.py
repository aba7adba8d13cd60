"""A frozen helper model behind an OpenAI-compatible HTTP endpoint (agentflow's `LanguageModel`).

AgentFlow users serve the helper models separately (vLLM's or SGLang's OpenAI-compatible server);
`HTTPEngine` lets the executor, verifier, generator, query analysis, base_generator tool and LLM
judge run there. One `generate` call is one POST to `{url}/completions` with every prompt of the
batch as a list of token ids (`prompt: [[ids], ...]`, which both servers accept), so the prompt
the server sees is exactly the one the agent built with the planner's tokenizer and chat template.
Sampling maps field by field: `max_tokens`, `temperature`, `top_p`, `top_k` (when set), `seed`,
and `stop_token_ids` (a vLLM/SGLang extension of the OpenAI schema).

What comes back is text. Helper calls are never trained, so no log-probs are requested:
`Generation.token_ids` are the reply re-encoded with the tokenizer (plus the stop token when the
server reports `finish_reason == "stop"`), used only to count tokens, and `Generation.logprobs` are
NaN, one per token, so that a caller that mistook them for training data would fail loudly.

Errors (connection refused, non-2xx, a body without `choices`, a choice count that is not the
prompt count) raise `RuntimeError` with the URL and the server's message. The API key, when the
configuration names an environment variable, is sent as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from agentflow.lm import Generation, SamplingConfig


class HTTPEngine:
    """`LanguageModel` over `{url}/completions` of an OpenAI-compatible server (see the module doc)."""

    def __init__(
        self, url: str, model: str, tokenizer: Any, *, api_key: str | None = None, timeout_s: float = 600.0
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"helper url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.model = model
        self._tokenizer = tokenizer
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._stats = {"generate_calls": 0, "prompts": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self._stats["generate_seconds"] = 0.0

    @classmethod
    def from_env(
        cls, url: str, model: str | None, tokenizer: Any, api_key_env: str | None, timeout_s: float = 600.0
    ) -> HTTPEngine:
        """Resolve the model name (default: the server's first model) and the API key (from `api_key_env`)."""
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"--helper-api-key-env {api_key_env}: that environment variable is not set; export it "
                    f"or drop the flag for a server without a key"
                )
        engine = cls(url, model or "", tokenizer, api_key=key, timeout_s=timeout_s)
        if not model:
            engine.model = engine.first_model()
        return engine

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _request(self, path: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            msg = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"helper endpoint {self.url}{path} answered HTTP {e.code}: {msg}") from e
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(
                f"helper endpoint {self.url}{path} is unreachable ({e}); start the server or fix --helper-url"
            ) from e

    def first_model(self) -> str:
        """The first model `{url}/models` lists (what `--helper-model` defaults to)."""
        data = self._request("/models", None).get("data") or []
        if not data:
            raise RuntimeError(f"helper endpoint {self.url}/models lists no model; pass --helper-model")
        return str(data[0]["id"])

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        if not prompts:
            return []
        if sampling.allowed_token_ids is not None:
            raise ValueError("the HTTP helper cannot sample under constrained decoding (allowed_token_ids)")
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": [[int(t) for t in p] for p in prompts],
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": 1,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = int(sampling.seed)
        if sampling.stop_token_ids:
            body["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
        t0 = time.perf_counter()
        out = self._request("/completions", body)
        self._stats["generate_seconds"] += time.perf_counter() - t0
        choices = out.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            got = "no choices" if not isinstance(choices, list) else f"{len(choices)} choices"
            raise RuntimeError(f"helper endpoint {self.url}/completions returned {got} for {len(prompts)} prompts")
        choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
        gens = []
        for p, c in zip(prompts, choices):
            text = c.get("text") or ""
            finish = "stop" if c.get("finish_reason") == "stop" else "length"
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            if finish == "stop" and sampling.stop_token_ids:
                ids.append(int(sampling.stop_token_ids[0]))
            gens.append(Generation(list(p), ids, [math.nan] * len(ids), text, finish))
        self._stats["generate_calls"] += 1
        self._stats["prompts"] += len(prompts)
        self._stats["prompt_tokens"] += sum(map(len, prompts))
        self._stats["generated_tokens"] += sum(len(g.token_ids) for g in gens)
        return gens

    def stats(self) -> dict[str, float]:
        return dict(self._stats)
