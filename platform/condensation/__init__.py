"""Folded Context Condensation: a Llama with per-layer segment memory.

    from condensation import CondensationConfig, CondensationForCausalLM
    model = CondensationForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", segment_length=512)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    SEGMENT_ATTENTION,
    CondensationCache,
    CondensationConfig,
    CondensationForCausalLM,
    CondensationModel,
    attention_unavailable_reason,
)

AutoConfig.register(CondensationConfig.model_type, CondensationConfig, exist_ok=True)
AutoModel.register(CondensationConfig, CondensationModel, exist_ok=True)
AutoModelForCausalLM.register(CondensationConfig, CondensationForCausalLM, exist_ok=True)

__all__ = [
    "SEGMENT_ATTENTION",
    "CondensationCache",
    "CondensationConfig",
    "CondensationForCausalLM",
    "CondensationModel",
    "attention_unavailable_reason",
]
