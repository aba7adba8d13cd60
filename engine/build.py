"""Builders of a run's parts: one place each, used by every entry point (train, solve, check-sync, bench).

    planner_dir      where the planner's HF directory is: `--model DIR`, or the tiny model built
                     into `run_dir/model` (reused when its settings match), or None for random
                     weights of a Qwen2.5 architecture made on the device
    build_tokenizer  the planner's tokenizer (the tiny one for random weights: its ids are a subset)
    build_planner    the model: loaded from the directory, or random weights that must fit
    choose_engine    which rollout engine: vLLM when asked, or when importable and there is a directory
    build_engine     the engine itself: vLLM from the directory, or the embedded engine that samples
                     from a given model object (the trainer's, so no sync is needed) or loads one
    check_recipe_fits  refuse, with the numbers, a run whose training or rollout phase cannot fit the device
    shard_planner    under torchrun: the planner (and its frozen reference) sharded with FSDP2
    build_helper     the frozen helper engine of every role but the planner (`HelperConfig`): the
                     policy engine itself, a second vLLM engine on a base checkpoint, the embedded
                     engine on the trainer's frozen reference model, or an OpenAI-compatible endpoint

Each builder appends what it decided to `notes` when given a list, so the run's header says it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.memory_model import Shape, one_process_state
from engine.model import build_random_model, check_model_dir, load_planner, preset_config
from engine.presets import HelperConfig, ModelConfig, RolloutConfig, RunConfig
from engine.rollout.protocol import RolloutEngine

GiB = float(1 << 30)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def planner_dir(model: ModelConfig, run_dir: Path, notes: list[str] | None = None) -> Path | None:
    """The planner's HF directory (see the module doc); None for random weights built on the device."""
    if model.path is not None:
        return check_model_dir(model.path)
    if model.arch != "tiny":
        return None
    from engine.tiny import ensure_tiny

    out, built = ensure_tiny(run_dir / "model", model.tiny)
    if built and notes is not None:
        notes.append(f"built the tiny model into {out}")
    return out


def build_tokenizer(model: ModelConfig, model_dir: Path | None, run_dir: Path, notes: list[str] | None = None):
    from transformers import AutoTokenizer

    if model_dir is not None:
        return AutoTokenizer.from_pretrained(model_dir)
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from engine.tiny import build_tokenizer as tiny_tokenizer

        tiny_tokenizer(model.tiny.vocab_size, model.tiny.extra_tokens).save_pretrained(tok_dir)
    if notes is not None:
        notes.append(f"tokenizer: the tiny tokenizer ({tok_dir}); its ids are a subset of the vocabulary")
    return AutoTokenizer.from_pretrained(tok_dir)


def check_fits(arch: Any, dtype: str, device: torch.device) -> None:
    """Refuse random weights that cannot train on `device`: weights + grads + AdamW's two moments."""
    shape = Shape.from_config(arch)
    n = shape.params
    need = one_process_state(shape, reference=False, vllm=False, dtype=dtype)["train"]
    free = device_free_bytes(device)
    if need > free:
        raise ValueError(
            f"{n / 1e9:.2f}B parameters in {dtype} need about {need / GiB:.1f} GiB for weights, gradients and AdamW "
            f"state, but {device} has {free / GiB:.1f} GiB free; run this preset on a GPU (--device cuda) or "
            f"pass a smaller model"
        )


def build_planner(
    model: ModelConfig, model_dir: Path | None, tokenizer: Any, device: torch.device, seed: int, notes: list[str]
):
    """The planner on `device`: loaded from `model_dir`, or random weights of `model.arch` (checked to fit)."""
    if model_dir is not None:
        planner = load_planner(model_dir, dtype=model.dtype, device=device, attention=model.attention)
    else:
        arch = preset_config(model.arch)
        for k, v in model.arch_overrides.items():
            setattr(arch, k, v)
        check_fits(arch, model.dtype, device)
        planner = build_random_model(arch, dtype=model.dtype, device=device, seed=seed, attention=model.attention)
        notes.append(f"random {model.arch} weights built on {device} (seed {seed})")
    rows = planner.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's LM head only {rows} rows; "
            f"they do not belong together"
        )
    return planner


def device_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def recipe_bytes(config: RunConfig, model_dir: Path | None) -> dict[str, int]:
    """Bytes one process of the run needs on its device at the peak of each phase, KV cache and activations
    not counted: `engine.memory_model.state_bytes` at world 1. Training holds the weights, gradients and
    AdamW's two moments (all in the model dtype) and the reference copy; the rollout holds the weights, the
    reference, a vLLM policy engine's copy (the engine `choose_engine` picks; the embedded engine samples from
    the trainer's weights) and a vLLM helper's weights (the helper sleeps during training, its weights in host
    memory)."""
    mc = config.model
    if model_dir is not None:
        from transformers import AutoConfig

        arch = AutoConfig.from_pretrained(model_dir)
    else:
        arch = preset_config(mc.arch)
        for k, v in mc.arch_overrides.items():
            setattr(arch, k, v)
    shape = Shape.from_config(arch)
    want = config.rollout.engine
    need = one_process_state(
        shape,
        reference=config.trainer.kl_coef > 0,
        vllm=want == "vllm" or choose_engine(want, model_dir)[0] == "vllm",
        vllm_helper=config.helper.kind == "vllm",
        dtype=mc.dtype,
    )
    return {"params": shape.params, **need}


def check_recipe_fits(config: RunConfig, model_dir: Path | None, device: torch.device) -> None:
    """Refuse (one line, with the numbers) a run whose training or rollout phase does not fit `device`."""
    need = recipe_bytes(config, model_dir)
    free = device_free_bytes(device)
    peak = max(need["train"], need["rollout"])
    if peak > free:
        n = need["params"]
        raise ValueError(
            f"preset {config.preset}: {n / 1e9:.2f}B parameters in {config.model.dtype} need about "
            f"{need['train'] / GiB:.1f} GiB to train (weights, gradients, AdamW, reference) and "
            f"{need['rollout'] / GiB:.1f} GiB in the rollout (weights, reference, engine and helper copies), "
            f"before KV cache and activations, but {device} has {free / GiB:.1f} GiB free; run it on a larger "
            f"device (one H200 holds it) or shrink it (--helper reference, --kl-coef 0, a smaller --model)"
        )


def choose_engine(want: str, model_dir: Path | None) -> tuple[str, str]:
    """(engine kind, why) for `want` in auto | vllm | embedded."""
    if want == "vllm":
        if model_dir is None:
            raise ValueError(
                "--engine vllm needs a model directory (vLLM loads from disk); pass --model DIR, "
                "or use --engine embedded for random weights built on the device"
            )
        if not vllm_available():
            raise RuntimeError("--engine vllm: vLLM is not installed here; install it or use --engine embedded")
        return "vllm", "requested"
    if want == "embedded":
        return "embedded", "requested"
    if model_dir is None:
        return "embedded", "auto: random weights on the device have no directory for vLLM to load"
    if not vllm_available():
        return "embedded", "auto: vLLM is not installed"
    return "vllm", "auto: vLLM is installed"


def build_engine(
    kind: str,
    rollout: RolloutConfig,
    *,
    model_dir: Path | None,
    dtype: str,
    seed: int,
    max_model_len: int,
    model: Any = None,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    external_tp: int | None = None,
) -> RolloutEngine:
    """The rollout engine of `kind` ("vllm" | "embedded"). The embedded engine samples from `model`
    (sharing its storage) when given, else loads `model_dir` onto `device`. `external_tp`: under
    torchrun, vLLM joins the process group the trainer made (`external_launcher`) with this
    tensor-parallel size; every rank of a tensor-parallel group must build it (a collective)."""
    if kind == "embedded":
        from engine.rollout.embedded import EmbeddedEngine

        if model is not None:
            return EmbeddedEngine(model, tokenizer)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return EmbeddedEngine.from_pretrained(model_dir, dtype=dtype, device=device)
    if kind != "vllm":
        raise ValueError(f"engine must be 'vllm' or 'embedded', got {kind!r}")
    from engine.rollout.vllm_engine import VLLMEngine

    kw: dict[str, Any] = {}
    if rollout.kv_cache_bytes is not None:
        kw["kv_cache_bytes"] = rollout.kv_cache_bytes
    if rollout.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    if external_tp is not None:
        kw.update(distributed_executor_backend="external_launcher", tensor_parallel_size=external_tp)
    return VLLMEngine.from_pretrained(
        model_dir, dtype=dtype, max_model_len=rollout.max_model_len or max_model_len, seed=seed, **kw
    )


def shard_planner(model: torch.nn.Module, kl_coef: float, dp: Any) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """FSDP2 over the ranks of `dp` (`engine.parallelize`): (the sharded planner, its sharded frozen reference
    copy of the current weights when kl_coef > 0, else None). Call it before any checkpoint is loaded."""
    import copy

    from engine.model import attach_packed_forward
    from engine.parallelize import apply_fsdp, build_mesh

    mesh = build_mesh(dp)
    ref = None
    if kl_coef > 0:
        ref = copy.deepcopy(model).requires_grad_(False)
        attach_packed_forward(ref)
        apply_fsdp(ref, mesh)
    attach_packed_forward(model)
    return apply_fsdp(model, mesh), ref


def build_helper(
    helper: HelperConfig,
    rollout: RolloutConfig,
    *,
    policy_engine: Any,
    model_dir: Path | None,
    reference_model: Any,
    tokenizer: Any,
    dtype: str,
    seed: int,
    max_model_len: int,
    notes: list[str] | None = None,
) -> Any:
    """The helper engine of `helper.kind` (see `engine.presets.HelperConfig`); every kind but
    `policy` holds weights that no update touches."""
    if helper.kind == "policy":
        out, why = policy_engine, "the policy engine (helpers follow the trained weights)"
    elif helper.kind == "reference":
        if reference_model is None:
            raise ValueError(
                "--helper reference needs the trainer's frozen reference model, which exists only when kl_coef > 0; "
                "set --kl-coef or choose --helper vllm|http|policy"
            )
        from engine.rollout.embedded import EmbeddedEngine

        out, why = EmbeddedEngine(reference_model, tokenizer), "embedded engine on the frozen reference model"
    elif helper.kind == "vllm":
        path = Path(helper.path) if helper.path is not None else model_dir
        if path is None:
            raise ValueError(
                "--helper vllm needs a base checkpoint directory: pass --helper-dir DIR (or --model DIR, whose "
                "starting weights the helper then keeps)"
            )
        path = check_model_dir(str(path))
        # helper prompts (judge, analysis) are not bounded by the planner's context budget: the checkpoint's own
        # context length, at most 32k (the KV cache size is set separately)
        positions = json.loads((path / "config.json").read_text()).get("max_position_embeddings", max_model_len)
        max_model_len = max(max_model_len, min(int(positions), 32768))
        if not vllm_available():
            raise RuntimeError("--helper vllm: vLLM is not installed here; use --helper reference|http|policy")
        out = build_engine(
            "vllm", rollout, model_dir=path, dtype=dtype, seed=seed, max_model_len=max_model_len, tokenizer=tokenizer
        )
        why = f"second vLLM engine on {path}"
    elif helper.kind == "http":
        from engine.rollout.http_engine import HTTPEngine

        out = HTTPEngine.from_env(helper.url, helper.model, tokenizer, helper.api_key_env, helper.timeout_s)
        why = f"OpenAI-compatible endpoint {helper.url} (model {out.model})"
    else:
        raise ValueError(f"unknown helper kind {helper.kind!r}")
    if notes is not None:
        notes.append(f"helper {helper.kind}: {why}")
    return out
