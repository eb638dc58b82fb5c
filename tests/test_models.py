"""Model presets, the embedded model, and the error for a model that cannot be loaded offline."""

import pytest

from lab.models import (
    EMBEDDED_MODEL,
    PRESETS,
    ModelUnavailableError,
    load_model_and_tokenizer,
    lora_config,
    qwen25_shaped_config,
    resolve_preset,
)


def test_embedded_model_loads_offline():
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_unavailable_model_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="no-such-org/no-such-model") as err:
        load_model_and_tokenizer("no-such-org/no-such-model")
    assert "--model DIR" in str(err.value) and EMBEDDED_MODEL in str(err.value)


def test_presets_and_lora_defaults():
    assert resolve_preset("qwen2.5-7b").source == "Qwen/Qwen2.5-7B" and not resolve_preset("qwen2.5-7b").chat
    assert resolve_preset("qwen2.5-1.5b-instruct").chat
    assert lora_config("qwen2.5-7b").r == 64 and "down_proj" in lora_config("qwen2.5-7b").target_modules
    assert resolve_preset("/some/local/Qwen2.5-0.5B-Instruct").chat
    assert set(PRESETS) >= {EMBEDDED_MODEL, "tiny", "qwen2.5-0.5b", "qwen2.5-7b-instruct"}
    with pytest.raises(ValueError, match="'13b'"):
        qwen25_shaped_config("13b")
