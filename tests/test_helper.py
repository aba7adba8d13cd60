"""The frozen helper engine: only the planner learns; the helper's outputs stay bit-identical.

Runs the toy preset shrunk to seconds (3 queries x G=4, one-token planner, rule executor/verifier/
generator) with the LLM judge, so the helper is asked during training, at a large learning rate.
The HTTP helper is tested against a real server on 127.0.0.1 that serves completions from an
embedded engine on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from agentflow import AgentConfig, Query, RoleModels, run_trajectories
from agentflow.chat import chat_ids, stop_ids
from agentflow.lm import SamplingConfig
from engine.build import vllm_available
from engine.loop import TrainLoop
from engine.metrics import read_metrics
from engine.presets import TOY_TOOLS, HelperConfig, RunConfig, toy
from engine.rollout.embedded import EmbeddedEngine
from engine.rollout.http_engine import HTTPEngine
from engine.tiny import TinyConfig, make_tiny

PROMPTS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [{"role": "system", "content": "You are the executor."}, {"role": "user", "content": "Command for search"}],
    [{"role": "user", "content": "Name a river in France."}],
]


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("toy") / "model"
    make_tiny(out, TinyConfig(extra_tokens=TOY_TOOLS))
    return str(out)


def helped_toy(run_dir: Path, model_dir: str, helper: HelperConfig, **kw) -> RunConfig:
    cfg = toy(run_dir=str(run_dir))
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=model_dir),
        rollout=dataclasses.replace(cfg.rollout, engine="embedded"),
        task=dataclasses.replace(cfg.task, queries_per_step=3, group_size=4),
        agent=dataclasses.replace(cfg.agent, judge="llm", judge_max_new_tokens=8),
        trainer=dataclasses.replace(cfg.trainer, lr=5e-2, kl_coef=1e-3, loss_impl="reference"),
        helper=helper,
        **{"steps": 2, "seed": 1, "gap_probe_seqs": 0, **kw},
    )


def probe(engine, tokenizer) -> list[tuple[list[int], list[float]]]:
    """Sampled (temperature 1, fixed seed) token ids and log-probs for the fixed prompts."""
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=stop_ids(tokenizer))
    gens = engine.generate([chat_ids(tokenizer, m) for m in PROMPTS], sampling)
    return [(list(g.token_ids), list(g.logprobs)) for g in gens]


@pytest.mark.parametrize("kind", ["reference", "policy"])
def test_the_helper_stays_bit_identical_while_the_planner_learns(tmp_path, toy_model_dir, kind):
    loop = TrainLoop(helped_toy(tmp_path / "run", toy_model_dir, HelperConfig(kind=kind)))
    tok = loop.tokenizer
    helper_before, planner_before = probe(loop.helper, tok), probe(loop.engine, tok)
    loop.run()
    helper_after, planner_after = probe(loop.helper, tok), probe(loop.engine, tok)
    assert planner_after != planner_before  # lr 5e-2: the policy moved
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["helper"] for r in rows] == [kind] * 2
    assert all(r["rollout/planner_calls"] == 1 and r["rollout/executor_calls"] == 0 for r in rows)  # rule executor
    asked = sum(r["reward/judge_asked"] for r in rows)
    assert asked > 0 and sum(r["rollout/judge_calls"] for r in rows) > 0  # the helper judged during training
    assert all(r["reward/judge_unparsed"] <= r["reward/judge_asked"] for r in rows)
    if kind == "reference":
        assert loop.helper is not loop.engine and loop.helper.model is loop.trainer.ref_model
        assert helper_after == helper_before  # token ids and log-probs, bit for bit
    else:
        assert loop.helper is loop.engine and helper_after != helper_before  # helpers follow the policy


def test_reference_helper_needs_a_reference_model(tmp_path, toy_model_dir):
    with pytest.raises(ValueError, match="exists only when kl_coef > 0; set --kl-coef"):
        cfg = helped_toy(tmp_path / "r", toy_model_dir, HelperConfig(kind="policy"))
        dataclasses.replace(
            cfg, trainer=dataclasses.replace(cfg.trainer, kl_coef=0.0), helper=HelperConfig(kind="reference")
        )
    with pytest.raises(ValueError, match="needs --helper-url"):
        HelperConfig(kind="http")
    with pytest.raises(ValueError, match="apply to --helper http, not vllm"):
        HelperConfig(kind="vllm", url="http://x")


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_a_second_vllm_engine_is_the_frozen_helper(tmp_path, toy_model_dir):
    cfg = helped_toy(tmp_path / "run", toy_model_dir, HelperConfig(kind="vllm"), steps=1)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, kv_cache_bytes=16 << 20))
    loop = TrainLoop(cfg)
    tok = loop.tokenizer
    before, planner_before = probe(loop.helper, tok), probe(loop.engine, tok)
    loop.run()
    with pytest.raises(RuntimeError, match="asleep; call wake"):  # the update left it asleep
        probe(loop.helper, tok)
    loop.helper.wake()
    assert probe(loop.helper, tok) == before and probe(loop.engine, tok) != planner_before
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["helper"] == "vllm" and r["helper/wake_s"] >= 0 and r["helper/sleep_s"] >= 0 for r in rows)
    assert type(loop.helper).__name__ == "VLLMEngine" and loop.engine_name == "embedded"
    loop.helper.shutdown()


class _Server:
    """An OpenAI-style completions server on 127.0.0.1 backed by an embedded engine (one thread)."""

    def __init__(self, engine: EmbeddedEngine, key: str | None = None) -> None:
        self.engine, self.key, self.requests = engine, key, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self._send(401, {"error": {"message": "invalid API key"}})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorised():
                    self._send(200, {"data": [{"id": "tiny-helper"}]})

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                sampling = SamplingConfig(
                    max_new_tokens=body["max_tokens"],
                    temperature=body["temperature"],
                    top_p=body["top_p"],
                    seed=body.get("seed"),
                    stop_token_ids=tuple(body.get("stop_token_ids", ())),
                )
                gens = outer.engine.generate(body["prompt"], sampling)
                choices = [{"index": i, "text": g.text, "finish_reason": g.finish_reason} for i, g in enumerate(gens)]
                self._send(200, {"choices": choices, "model": body["model"]})

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_helper_against_a_local_server(tmp_path, tiny_model_dir, monkeypatch):
    served = EmbeddedEngine.from_pretrained(tiny_model_dir)
    tok = served.tokenizer
    with _Server(served, key="s3cret") as server:
        monkeypatch.setenv("FLOWGRPO_TEST_KEY", "s3cret")
        http = HTTPEngine.from_env(server.url, None, tok, "FLOWGRPO_TEST_KEY")
        assert http.model == "tiny-helper"  # the server's first model
        prompts = [chat_ids(tok, m) for m in PROMPTS]
        sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=stop_ids(tok), seed=3)
        remote, local = http.generate(prompts, sampling), served.generate(prompts, sampling)
        assert [g.text for g in remote] == [g.text for g in local]
        assert [g.finish_reason for g in remote] == [g.finish_reason for g in local]
        assert len(server.requests) == 1 and server.requests[0]["prompt"] == prompts  # one batched request, ids
        assert all(len(g.logprobs) == len(g.token_ids) and all(x != x for x in g.logprobs) for g in remote)
        # the four-agent loop with every helper role on the endpoint, the planner on a local engine
        planner = EmbeddedEngine.from_pretrained(tiny_model_dir)
        cfg = AgentConfig(max_turns=1, planner_max_new_tokens=8, executor_max_new_tokens=8, judge="llm")
        cfg = dataclasses.replace(cfg, verifier_max_new_tokens=4, generator_max_new_tokens=8, context_budget=1024)
        qs = [Query("a", "What is 2 + 2?", "4"), Query("b", "What is 3 + 3?", "6")]
        n_before = len(server.requests)
        res = run_trajectories(RoleModels.helped(planner, http), qs, 2, cfg, seed=0)
        assert res.counters["planner_calls"] == 1 and res.counters["generator_calls"] == 1
        assert len(server.requests) - n_before == sum(
            res.counters.get(f"{r}_calls", 0) for r in ("executor", "verifier", "generator", "judge", "base_generator")
        )
        # a wrong key and a dead endpoint are one clear line each
        with pytest.raises(RuntimeError, match=r"answered HTTP 401: .*invalid API key"):
            HTTPEngine(server.url, "tiny-helper", tok, api_key="wrong").generate(prompts[:1], sampling)
    with pytest.raises(RuntimeError, match=r"unreachable .*start the server or fix --helper-url"):
        HTTPEngine(server.url, "tiny-helper", tok, timeout_s=5).generate(prompts[:1], sampling)
    monkeypatch.delenv("FLOWGRPO_TEST_KEY")
    with pytest.raises(ValueError, match="FLOWGRPO_TEST_KEY: that environment variable is not set"):
        HTTPEngine.from_env(server.url, "m", tok, "FLOWGRPO_TEST_KEY")


def test_train_with_the_http_helper(tmp_path, toy_model_dir):
    served = EmbeddedEngine.from_pretrained(toy_model_dir)
    with _Server(served) as server:
        cfg = helped_toy(tmp_path / "run", toy_model_dir, HelperConfig(kind="http", url=server.url), steps=1)
        loop = TrainLoop(cfg)
        assert loop.helper.model == "tiny-helper"
        loop.run()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["helper"] == "http" and row["rollout/judge_calls"] == len(server.requests) > 0
    assert torch.isfinite(torch.tensor(row["actor/loss"]))
