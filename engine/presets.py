"""Configuration of a training run: one dataclass per component, composed into `RunConfig`, and presets.

    ModelConfig    which planner: the tiny model (built locally), or a Qwen2.5 architecture from a
                   local checkpoint directory or with random weights built on the device
    RolloutConfig  which rollout engine (auto | vllm | embedded) and its memory settings
    HelperConfig   which frozen model serves every role but the planner (policy | vllm | reference | http)
    TaskConfig     where the queries come from, queries per step (B) and group size (G)
    AgentConfig    the four-agent loop (agentflow.runner)
    TrainerConfig  the Flow-GRPO update (engine.trainer)
    AdvantageConfig  trajectory or turn grouping of the rewards (engine.advantage)
    RunConfig      all of the above plus steps, seed, run directory, checkpoint and probe cadence

A preset is a function returning a `RunConfig` (`PRESETS`); `with_overrides` applies the command
line's (and the benchmarks') overrides, each to its component (`OVERRIDES`). Checks that span components live in `RunConfig.__post_init__`:
the trainer must score the distribution the planner samples from (same temperature; no top-p/top-k,
whose truncated distributions the trainer does not reproduce).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentflow.runner import AgentConfig
from agentflow.tasks.data import DataSpec
from engine.advantage import AdvantageConfig
from engine.attention import ATTENTION_CHOICES
from engine.model import MODEL_SHAPES
from engine.tiny import TinyConfig
from engine.trainer import TrainerConfig

ENGINES = ("auto", "vllm", "embedded")
HELPERS = ("policy", "vllm", "reference", "http")
TOY_TOOLS = ("calculator", "python", "search")


@dataclass(frozen=True)
class ModelConfig:
    """The planner. `path`: a local HF directory; None builds one (tiny: into the run directory;
    a Qwen2.5 architecture: random weights directly on the device, for performance work)."""

    arch: str = "tiny"  # "tiny" or a key of engine.model.MODEL_SHAPES
    path: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)  # used when arch == "tiny" and path is None
    arch_overrides: dict[str, Any] = field(default_factory=dict)  # Qwen2Config fields (e.g. fewer layers)
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    attention: str = "auto"  # packed-attention backend: "auto" or one of engine.attention.BACKENDS

    def __post_init__(self) -> None:
        if self.arch != "tiny" and self.arch not in MODEL_SHAPES:
            raise ValueError(f"model arch must be 'tiny' or one of {sorted(MODEL_SHAPES)}, got {self.arch!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"model attention must be one of {list(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.arch_overrides and self.arch == "tiny":
            raise ValueError("arch_overrides apply to the Qwen2.5 architectures; for tiny set ModelConfig.tiny")


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout engine. auto: vLLM when it is importable and the model is a directory, else embedded."""

    engine: str = "auto"
    kv_cache_bytes: int | None = None  # vLLM; None: 64 MiB on CPU
    gpu_memory_utilization: float | None = None  # vLLM on CUDA; None: the engine's default (0.5)
    max_model_len: int | None = None  # vLLM; None: the agent's context budget
    sleep_level: int = 2  # what the engine releases for training (1: KV cache, 2: also weights)
    offload_optimizer: bool | None = None  # optimizer state to pinned host memory during rollout; None: on CUDA
    tensor_parallel_size: int = 1  # under torchrun: ranks sharing one vLLM engine (engine.ranks); must divide world

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"rollout engine must be one of {ENGINES}, got {self.engine!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size (--tp) must be >= 1, got {self.tensor_parallel_size}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level}")


@dataclass(frozen=True)
class HelperConfig:
    """The helper engine: query analysis, executor, verifier, generator, the base_generator tool and the
    LLM judge run on it; only the planner runs on the trained policy (AgentFlow's premise).

    policy     every role on the policy engine (the helpers follow the trained weights)
    vllm       a second vLLM engine on `path` (None: the planner's starting checkpoint directory);
               it is woken before each rollout and sleeps (level 1) for the update
    reference  the embedded engine on the trainer's frozen reference model (needs kl_coef > 0):
               the base weights, no extra memory
    http       an OpenAI-compatible completions endpoint at `url` serving `model`, the API key read
               from the environment variable `api_key_env` (None: no key)
    """

    kind: str = "policy"
    path: str | None = None
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.kind not in HELPERS:
            raise ValueError(f"helper must be one of {HELPERS}, got {self.kind!r}")
        if self.kind == "http" and not self.url:
            raise ValueError("--helper http needs --helper-url (an OpenAI-compatible server, e.g. http://host:8000/v1)")
        if self.kind != "http" and (self.url or self.model or self.api_key_env):
            raise ValueError(
                f"--helper-url/--helper-model/--helper-api-key-env apply to --helper http, not {self.kind}"
            )
        if self.path is not None and self.kind != "vllm":
            raise ValueError(f"--helper-dir applies to --helper vllm, not {self.kind}")
        if self.timeout_s <= 0:
            raise ValueError(f"helper timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class TaskConfig:
    """Queries: a built-in task generated per step (seeded by run seed and step), or a data file cycled
    (JSONL, parquet or AgentFlow's benchmark JSON; `agentflow.tasks.data`, columns named by the `*_key`
    fields or found under the usual names). `val_data`: files validated on (greedy, one trajectory per
    query) every `val_every` steps (0: never) and, with `val_before_train`, before step 1."""

    name: str = "arithmetic"  # a key of agentflow.tasks.TASKS
    data: str | None = None  # a data file; overrides name
    queries_per_step: int = 2  # B
    group_size: int = 4  # G
    question_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    source_key: str | None = None
    answer_sep: str | None = None  # split string answers into several acceptable ones ("; " for AgentFlow's NQ)
    val_data: tuple[str, ...] = ()
    val_every: int = 0
    val_before_train: bool = False

    def spec(self) -> DataSpec:
        """How the data files' columns map onto queries."""
        return DataSpec(self.question_key, self.answer_key, self.id_key, self.source_key, self.answer_sep)

    def __post_init__(self) -> None:
        from agentflow.tasks import TASKS

        if self.data is None and self.name not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)} (or pass a JSONL file as data), got {self.name!r}")
        if self.queries_per_step < 1:
            raise ValueError(f"queries_per_step must be >= 1, got {self.queries_per_step}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0: no periodic validation), got {self.val_every}")
        if (self.val_every or self.val_before_train) and not self.val_data:
            raise ValueError("val_every / val_before_train need validation data: pass --val-data FILE")
        self.spec()
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2: GRPO's baseline is the group mean, a group of one has advantage 0 "
                f"(got {self.group_size})"
            )


@dataclass(frozen=True)
class RunConfig:
    preset: str
    model: ModelConfig
    rollout: RolloutConfig
    task: TaskConfig
    agent: AgentConfig
    trainer: TrainerConfig
    steps: int = 5
    seed: int = 0
    run_dir: str = "runs/tiny"
    save_every: int = 1  # a checkpoint every k steps and at the last; a kill loses at most k steps
    keep_last: int = 2
    trace_step: int | None = None
    gap_probe_seqs: int = 4  # sequences re-scored before / sampled after each sync (0: no probe)
    helper: HelperConfig = field(default_factory=HelperConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    gap_probe_every: int = 10  # probe on step 1 and every k-th step after (a diagnostic, not part of training)

    def __post_init__(self) -> None:
        if self.helper.kind == "reference" and self.trainer.kl_coef == 0:
            raise ValueError(
                "--helper reference runs the helpers on the trainer's frozen reference model, which exists only "
                "when kl_coef > 0; set --kl-coef (e.g. 0.001) or choose --helper vllm|http|policy"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.save_every < 1 or self.keep_last < 1:
            raise ValueError(f"save_every and keep_last must be >= 1, got {self.save_every}, {self.keep_last}")
        if self.gap_probe_seqs < 0:
            raise ValueError(f"gap_probe_seqs must be >= 0, got {self.gap_probe_seqs}")
        if self.gap_probe_every < 1:
            raise ValueError(f"gap_probe_every must be >= 1 (1: every step), got {self.gap_probe_every}")
        if self.trace_step is not None and self.trace_step < 1:
            raise ValueError(f"trace_step must be a step number >= 1, got {self.trace_step}")
        if self.trainer.temperature != self.agent.temperature:
            raise ValueError(
                f"the trainer scores log_softmax(logits / {self.trainer.temperature}) but the planner samples at "
                f"temperature {self.agent.temperature}; set both to the same value"
            )
        if self.agent.top_p != 1.0 or self.agent.top_k > 0:
            raise ValueError(
                "training needs the planner sampled from the full (or allowed-token) softmax: top_p=1 and top_k=-1 "
                f"(got top_p={self.agent.top_p}, top_k={self.agent.top_k}); the trainer does not reproduce truncation"
            )
        if self.agent.temperature == 0:
            raise ValueError("the planner must sample (temperature > 0): greedy decoding gives every group one answer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def summary_lines(self) -> list[str]:
        """The resolved configuration, one line per component (`key=value` for every field)."""

        def fields(obj: Any) -> str:
            parts = []
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    v = "(" + fields(v) + ")"
                parts.append(f"{f.name}={v}")
            return " ".join(parts)

        run = {
            k: getattr(self, k)
            for k in (
                "preset",
                "steps",
                "seed",
                "run_dir",
                "save_every",
                "keep_last",
                "trace_step",
                "gap_probe_seqs",
                "gap_probe_every",
            )
        }
        return [
            "run      " + " ".join(f"{k}={v}" for k, v in run.items()),
            "model    " + fields(self.model),
            "rollout  " + fields(self.rollout),
            "task     " + fields(self.task),
            "agent    " + fields(self.agent),
            "trainer  " + fields(self.trainer),
            "helper   " + fields(self.helper),
            "adv      " + fields(self.advantage),
        ]


def tiny(run_dir: str = "runs/tiny") -> RunConfig:
    """The default: the whole four-agent loop (LLM executor, verifier and generator on the planner's engine)
    on arithmetic with the tiny random model, AgentFlow's optimiser settings, a few short steps on CPU.

    A random model earns no reward, so every group has zero variance and the update is the KL term only:
    this preset shows the loop, its phases and their cost, not learning (see `toy` for that)."""
    agent = AgentConfig(
        max_turns=2,
        planner_max_new_tokens=32,
        context_budget=1024,
        tool_result_chars=200,
        executor_max_new_tokens=24,
        verifier_max_new_tokens=4,
        generator_max_new_tokens=16,
        base_generator_max_new_tokens=16,
    )
    return RunConfig(
        preset="tiny",
        model=ModelConfig(arch="tiny", tiny=TinyConfig(), dtype="float32"),
        rollout=RolloutConfig(kv_cache_bytes=None),
        task=TaskConfig(name="arithmetic", queries_per_step=2, group_size=4),
        agent=agent,
        trainer=TrainerConfig(lr=1e-6, kl_coef=0.001, micro_batch_tokens=4096, loss_impl="fused"),
        steps=5,
        run_dir=run_dir,
    )


def toy(run_dir: str = "runs/toy") -> RunConfig:
    """Learning visible on a CPU: the tiny planner learns from scratch which tool a query needs.

    The tool names are single added tokens; the planner's one-token response is sampled under
    constrained decoding over {calculator, python, search, end-of-turn} and the trainer scores the same
    restricted softmax (`TrainerConfig.allowed_token_ids`, filled in when the run is built). Executor,
    verifier and generator are rule-based, so the reward is 1 exactly when the chosen tool, really run,
    yields the gold answer (`agentflow.tasks.toy`). Untrained, about 1/4 of the choices succeed.

    Settings measured on the 2-core CPU (README, Training): B = 9 queries (3 of each kind) × G = 8;
    lr 5e-4 (at 3e-3 the policy collapsed onto one tool within 15 steps, every group then had zero
    variance and learning stopped; an entropy bonus of 0.01 at lr 1e-3 learned fast but later flipped
    a whole kind to a wrong tool); no KL term, since the reference policy is a random model."""
    agent = AgentConfig(
        planner_format="tool_token",
        planner_max_new_tokens=1,
        max_turns=1,
        context_budget=512,
        tools=TOY_TOOLS,
        executor="rule",
        verifier="rule",
        generator="rule",
        search_top_k=1,
        tool_result_chars=400,
    )
    return RunConfig(
        preset="toy",
        model=ModelConfig(arch="tiny", tiny=TinyConfig(extra_tokens=TOY_TOOLS), dtype="float32"),
        rollout=RolloutConfig(),
        task=TaskConfig(name="toy", queries_per_step=9, group_size=8),
        agent=agent,
        trainer=TrainerConfig(lr=5e-4, kl_coef=0.0, micro_batch_tokens=8192, grad_clip=1.0, loss_impl="fused"),
        steps=80,
        run_dir=run_dir,
        keep_last=2,
    )


SMOLLM2_DIR = "models/smollm2-135m-instruct"  # `make model` / `flowgrpo make-model smollm2-135m-instruct DIR`


def smollm2(run_dir: str = "runs/smollm2") -> RunConfig:
    """The `toy` task on the real SmolLM2-135M-Instruct (`flowgrpo make-model smollm2-135m-instruct
    models/smollm2-135m-instruct`, or `--model DIR`): the pretrained planner learns which tool a query needs.

    Planner format `tool_prefix`: SmolLM2 splits "calculator" into two tokens, so each tool is named by
    its name's first token and the one-token response is sampled under constrained decoding over those
    three tokens and <|im_end|>, scored by the trainer on the same restricted softmax. Executor, verifier
    and generator are rule-based (as in `toy`), so no helper model is needed and the reward is 1 exactly
    when the chosen tool, really run, yields the gold answer.

    Measured base model (exact probabilities of the constrained softmax, 30 toy queries, seed 0): expected
    success 0.59 (python queries 0.99, search 0.49, calculator 0.29: it prefers python for arithmetic);
    answering directly without tools, 0 of 8. After this preset's 20 steps the same 30 queries (which
    training, seeds 1-20, never drew) give 1.000 (calculator 0.999). Curve: success 0.78 over the first
    5 steps, 1.00 over the last 5; every group has zero variance from step 5 on
    (bench/results/smollm2-cpu-curve.json, 2-core CPU under load).
    B = 3 queries (one of each kind) × G = 4 keeps a step near a minute on 2 busy cores (a step's update
    is a forward and backward of the whole 135M model over ~1400 prompt tokens). lr 3e-5: at 1e-4 the
    policy moved onto the end-of-turn token within 4 steps (25% invalid actions, success 0.25).
    Embedded rollout: a one-token response is one prefill on the trainer's own weights (no second copy,
    no sync). Float32, no KL term (the clip keeps each update near the sampling policy)."""
    cfg = toy(run_dir)
    return dataclasses.replace(
        cfg,
        preset="smollm2",
        model=ModelConfig(path=SMOLLM2_DIR, dtype="float32"),
        rollout=RolloutConfig(engine="embedded"),
        task=TaskConfig(name="toy", queries_per_step=3, group_size=4),
        agent=dataclasses.replace(cfg.agent, planner_format="tool_prefix"),
        trainer=TrainerConfig(lr=3e-5, kl_coef=0.0, micro_batch_tokens=4096, grad_clip=1.0, loss_impl="fused"),
        steps=20,
        save_every=20,
        keep_last=1,
    )


def _qwen(arch: str, run_dir: str) -> RunConfig:
    """A Qwen2.5 architecture for performance work: `--model DIR` (a local HF checkpoint) or, without it,
    random bf16 weights built on the device with the tiny tokenizer (its ids are a subset of the
    vocabulary); the same loop, engines and trainer as `tiny`, at AgentFlow's shapes."""
    return RunConfig(
        preset=arch,
        model=ModelConfig(arch=arch, dtype="bfloat16"),
        rollout=RolloutConfig(),
        task=TaskConfig(name="arithmetic", queries_per_step=4, group_size=8),
        agent=AgentConfig(max_turns=3, planner_max_new_tokens=96, context_budget=4096),
        trainer=TrainerConfig(
            lr=1e-6, kl_coef=0.001, micro_batch_tokens=16384, gradient_checkpointing=True, loss_impl="fused"
        ),
        steps=10,
        run_dir=run_dir,
        save_every=50,
        keep_last=1,
    )


def qwen2_5_1_5b(run_dir: str = "runs/qwen2.5-1.5b") -> RunConfig:
    return _qwen("qwen2.5-1.5b", run_dir)


def qwen2_5_7b(run_dir: str = "runs/qwen2.5-7b") -> RunConfig:
    return _qwen("qwen2.5-7b", run_dir)


def agentflow(run_dir: str = "runs/agentflow") -> RunConfig:
    """AgentFlow's training recipe (lupantech/AgentFlow train/config.yaml, verl 0.5; README table): Qwen2.5-7B
    (pass the Instruct checkpoint with --model DIR), 32 queries x G = 8, 3 planner turns, planner responses up
    to 2048 tokens after prompts up to 18432, sampling temperature 0.7, lr 1e-6, AdamW weight decay 0.01,
    grad-norm clip 1, k3 KL at 0.001, clip 0.2 / 0.3 with dual clip 3, token-mean, 4 mini-batches (mini-batch
    of 8 queries), advantages over planner turns, AgentFlow's planner format, the LLM judge, every other role
    on a frozen second vLLM engine on the starting checkpoint. `TrainLoop` refuses it, with the numbers, on a
    device that cannot hold it (`engine.build.check_recipe_fits`)."""
    agent = AgentConfig(
        planner_format="agentflow",
        max_turns=3,
        planner_max_new_tokens=2048,
        context_budget=18432 + 2048,
        temperature=0.7,
        tool_result_chars=4000,
        judge="llm",
        executor_max_new_tokens=512,
        verifier_max_new_tokens=64,
        generator_max_new_tokens=512,
        base_generator_max_new_tokens=512,
        analysis_max_new_tokens=1024,
        judge_max_new_tokens=512,
    )
    trainer = TrainerConfig(
        lr=1e-6,
        weight_decay=0.01,
        grad_clip=1.0,
        mini_batches=4,
        kl_coef=0.001,
        kl_type="k3",
        clip_low=0.2,
        clip_high=0.3,
        clip_ratio_c=3.0,
        loss_agg="token-mean",
        entropy_coef=0.0,
        temperature=0.7,
        micro_batch_tokens=32768,
        gradient_checkpointing=True,
        loss_impl="fused",
    )
    return RunConfig(
        preset="agentflow",
        model=ModelConfig(arch="qwen2.5-7b", dtype="bfloat16"),
        rollout=RolloutConfig(gpu_memory_utilization=0.6),
        task=TaskConfig(name="arithmetic", queries_per_step=32, group_size=8),
        agent=agent,
        trainer=trainer,
        steps=10,
        run_dir=run_dir,
        save_every=2,
        keep_last=1,
        helper=HelperConfig(kind="vllm"),
        advantage=AdvantageConfig(grouping="turn"),
    )


PRESETS: dict[str, Callable[..., RunConfig]] = {
    "agentflow": agentflow,
    "tiny": tiny,
    "toy": toy,
    "smollm2": smollm2,
    "qwen2.5-1.5b": qwen2_5_1_5b,
    "qwen2.5-7b": qwen2_5_7b,
}


# override name -> (component of RunConfig or "" for RunConfig itself, field)
OVERRIDES: dict[str, tuple[str, str]] = {
    "model": ("model", "path"),
    "device": ("model", "device"),
    "attention": ("model", "attention"),
    "engine": ("rollout", "engine"),
    "tp": ("rollout", "tensor_parallel_size"),
    "group_size": ("task", "group_size"),
    "queries_per_step": ("task", "queries_per_step"),
    "data": ("task", "data"),
    "question_key": ("task", "question_key"),
    "answer_key": ("task", "answer_key"),
    "id_key": ("task", "id_key"),
    "source_key": ("task", "source_key"),
    "answer_sep": ("task", "answer_sep"),
    "val_data": ("task", "val_data"),
    "val_every": ("task", "val_every"),
    "val_before_train": ("task", "val_before_train"),
    "corpus": ("agent", "search_corpus"),
    "corpus_index": ("agent", "search_index_dir"),
    "search_top_k": ("agent", "search_top_k"),
    "lr": ("trainer", "lr"),
    "micro_batch_tokens": ("trainer", "micro_batch_tokens"),
    "lm_head_algorithm": ("trainer", "lm_head_algorithm"),
    "kl_coef": ("trainer", "kl_coef"),
    "steps": ("", "steps"),
    "seed": ("", "seed"),
    "run_dir": ("", "run_dir"),
    "trace_step": ("", "trace_step"),
    "save_every": ("", "save_every"),
    "keep_last": ("", "keep_last"),
    "helper": ("helper", "kind"),
    "helper_dir": ("helper", "path"),
    "helper_url": ("helper", "url"),
    "helper_model": ("helper", "model"),
    "helper_api_key_env": ("helper", "api_key_env"),
    "judge": ("agent", "judge"),
    "advantage": ("advantage", "grouping"),
    "planner_format": ("agent", "planner_format"),
    "planner_max_new_tokens": ("agent", "planner_max_new_tokens"),
    "context_budget": ("agent", "context_budget"),
    "mini_batches": ("trainer", "mini_batches"),
    "weight_decay": ("trainer", "weight_decay"),
    "gap_probe_every": ("", "gap_probe_every"),
}


def with_overrides(cfg: RunConfig, **overrides: Any) -> RunConfig:
    """`cfg` with each non-None override applied to its component (names in `OVERRIDES`), re-validated."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown overrides {unknown}; known: {sorted(OVERRIDES)}")
    parts: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is not None:
            component, fld = OVERRIDES[name]
            parts.setdefault(component, {})[fld] = value
    top = parts.pop("", {})
    for component, fields_ in parts.items():
        top[component] = dataclasses.replace(getattr(cfg, component), **fields_)
    return dataclasses.replace(cfg, **top)


def preset(name: str, **kw: Any) -> RunConfig:
    try:
        return PRESETS[name](**kw)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
