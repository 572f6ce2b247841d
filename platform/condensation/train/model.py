"""Build the model a run trains: from a HF folder / hub id (Llama or Condensation) or from a named size."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..modeling import CondensationForCausalLM
from ..sizes import build_config


def build_model(m: ModelConfig, dtype: torch.dtype = torch.float32) -> CondensationForCausalLM:
    """`CondensationForCausalLM` in `dtype` (fp32 master weights; DeepSpeed casts for bf16)."""
    kw = m.model_kwargs()
    if m.init_from:
        from ..pretrained import resolve_pretrained  # a registered name (e.g. "smollm2-135m-instruct") -> its folder

        return CondensationForCausalLM.from_pretrained(resolve_pretrained(m.init_from), dtype=dtype, **kw)
    model = CondensationForCausalLM(build_config(m.size, **kw))
    return model.to(dtype)
