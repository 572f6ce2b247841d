"""The optimised paths on a CUDA GPU in bf16: every schedule and attention kernel against the plain sequential
eager reference, and one segment against transformers' Llama. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from condensation import SEGMENT_ATTENTION, CondensationForCausalLM, attention_unavailable_reason
from condensation.sizes import build_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(**kw):
    torch.manual_seed(0)
    cfg = build_config("table1", vocab_size=4096, **kw)
    m = CondensationForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.05)
    return m.cuda().to(torch.bfloat16)


def _run(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return out.logits.float(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", [dict(segment_attention=a) for a in sorted(SEGMENT_ATTENTION)]
                         + [dict(checkpoint_cells=True), dict(segment_schedule="sequential"), dict(compile_cells=True),
                            dict(compile_cells=True, checkpoint_cells=True)])
def test_bf16_paths_match_sequential_eager(variant):
    name = variant.get("segment_attention", "sdpa")
    reason = attention_unavailable_reason(name, "cuda", backward=True)
    if reason:
        pytest.skip(reason)
    ids = torch.randint(0, 4096, (2, 1200), device="cuda")
    ref_logits, ref_grads = _run(_model(segment_length=256, segment_schedule="sequential", segment_attention="eager"), ids)
    logits, grads = _run(_model(segment_length=256, **variant), ids)
    assert _rel(logits, ref_logits) < 2e-2
    assert _rel(grads, ref_grads) < 5e-2


def test_one_segment_is_llama_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _model(segment_length=512)
    llama_cfg = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlamaConfig().to_dict()})
    llama = LlamaForCausalLM(llama_cfg).cuda().to(torch.bfloat16)
    llama.load_state_dict(model.state_dict())
    ids = torch.randint(0, 4096, (2, 500), device="cuda")
    with torch.no_grad():
        assert _rel(model(ids).logits.float(), llama(ids).logits.float()) < 2e-2
