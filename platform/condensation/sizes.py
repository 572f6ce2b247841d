"""Named model sizes in one dict (torchtitan-style), from a tiny debug size to the paper's Llama-3.2 models.

`build_config("table1", segment_length=256)` returns a `CondensationConfig`; any field can be overridden.
"""

from __future__ import annotations

from .modeling import CondensationConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

MODEL_SIZES: dict[str, dict] = {
    # unit tests: every shape distinct enough that a transposed or mis-grouped head shows
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, segment_length=32),
    # the CPU default of the workloads: learns the passkey task on 2 cores in minutes
    "tiny-cpu": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, segment_length=64),
    # the paper's Table I memory/speed model: Llama-3.2-1B family, 126M parameters
    "table1": dict(vocab_size=128256, hidden_size=512, intermediate_size=8192, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, segment_length=256,
                   tie_word_embeddings=True, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M, the shape of `condensation.pretrained`'s SmolLM2-135M-Instruct):
    # 134.5M parameters, deep and narrow (30 layers of width 576), so every cell is small
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, segment_length=512,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, segment_length=512,
                         tie_word_embeddings=True, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, segment_length=512,
                         tie_word_embeddings=True, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
}


def build_config(name: str, **overrides) -> CondensationConfig:
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(MODEL_SIZES)}")
    fields = {**MODEL_SIZES[name], **overrides}
    if "rope_parameters" in fields:
        fields["rope_parameters"] = dict(fields["rope_parameters"])
    return CondensationConfig(**fields)
