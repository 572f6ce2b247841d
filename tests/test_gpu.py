"""The optimised paths on a CUDA GPU in bf16. bf16 itself moves logits by about 1-2 % here, so each path is held to
the error that the plain sequential eager reference makes in bf16, both measured against a float32 reference run
of the same weights. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from condensation import SEGMENT_ATTENTION, CondensationForCausalLM, attention_unavailable_reason
from condensation.sizes import build_config
from test_stacked_params import per_layer_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(dtype, stacked_params=False, **kw):
    torch.manual_seed(0)
    cfg = build_config("table1", vocab_size=4096, **kw)
    m = CondensationForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.05)
    if stacked_params:  # the same weights, stored stacked
        stacked = CondensationForCausalLM(build_config("table1", vocab_size=4096, stacked_params=True, **kw))
        stacked.load_state_dict(m.state_dict())
        m = stacked
    return m.cuda().to(dtype)


def _run(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = per_layer_grads(model)  # stacked_params: under the per-layer names
    return out.logits.float(), torch.cat([grads[n].float().flatten() for n in sorted(grads)])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _reference(make):
    """ids, the float32 eager sequential model's (logits, grads), and how far its bf16 twin lands from them: the
    error every bf16 fast path is held to."""
    ids = torch.randint(0, 4096, (2, 1200), device="cuda")
    ref = dict(segment_length=256, segment_schedule="sequential", segment_attention="eager")
    fp32 = _run(make(torch.float32, **ref), ids)
    bf16 = _run(make(torch.bfloat16, **ref), ids)
    return ids, fp32, (_rel(bf16[0], fp32[0]), _rel(bf16[1], fp32[1]))


@pytest.fixture(scope="module")
def reference():
    return _reference(_model)


@pytest.mark.parametrize("variant", [dict(segment_attention=a) for a in sorted(SEGMENT_ATTENTION)]
                         + [dict(checkpoint_cells=True), dict(segment_schedule="sequential"), dict(compile_cells=True),
                            dict(compile_cells=True, checkpoint_cells=True), dict(weight_grads="accumulate"),
                            dict(weight_grads="deferred"), dict(weight_grads="deferred", checkpoint_cells=True),
                            dict(weight_grads="deferred", compile_cells=True)])
def test_bf16_paths_as_close_as_the_reference(variant, reference):
    reason = attention_unavailable_reason(variant.get("segment_attention", "sdpa"), "cuda", backward=True)
    if reason:
        pytest.skip(reason)
    ids, (ref_logits, ref_grads), (base_logits, base_grads) = reference
    logits, grads = _run(_model(torch.bfloat16, segment_length=256, **variant), ids)
    err = {"variant": variant, "logits": _rel(logits, ref_logits), "grads": _rel(grads, ref_grads),
           "reference_bf16_logits": base_logits, "reference_bf16_grads": base_grads}
    print(err)
    assert err["logits"] < 2 * base_logits + 1e-3 and err["grads"] < 2 * base_grads + 1e-3, err


def test_one_segment_is_llama_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, 4096, (2, 500), device="cuda")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype, segment_length=512)
        llama_cfg = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlamaConfig().to_dict()})
        llama = LlamaForCausalLM(llama_cfg).cuda().to(dtype)
        llama.load_state_dict(model.state_dict())
        with torch.no_grad():
            out[dtype] = (model(ids).logits.float(), llama(ids).logits.float())
    assert _rel(out[torch.float32][0], out[torch.float32][1]) < 1e-4  # exactly Llama up to float32 round-off
    llama_err = _rel(out[torch.bfloat16][1], out[torch.float32][1])
    ours_err = _rel(out[torch.bfloat16][0], out[torch.float32][1])
    print({"llama_bf16": llama_err, "condensation_bf16": ours_err})
    assert ours_err < 2 * llama_err + 1e-3


def _fused_grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids, return_logits=False).loss.backward()
    grads = per_layer_grads(model)
    return torch.cat([grads[n].float().flatten() for n in sorted(grads)])


@pytest.mark.parametrize("variant", [dict(), dict(checkpoint_cells=True, checkpoint_group_steps=3),
                                     dict(checkpoint_group_steps=2, compile_cells=True)])
def test_bf16_fused_loss_gradients_as_close_as_the_reference(variant, reference):
    """The training path (NormLinearCrossEntropy, no logits) in bf16 against float32 autograd through logits."""
    ids, (_, ref_grads), (_, base_grads) = reference
    grads = _fused_grads(_model(torch.bfloat16, segment_length=256, loss_chunk_tokens=700, **variant), ids)
    err = _rel(grads, ref_grads)
    print({"variant": variant, "grads": err, "reference_bf16_grads": base_grads})
    assert err < 2 * base_grads + 1e-3


@pytest.mark.parametrize("weight_grads", ["autograd", "deferred"])
def test_cuda_graph_step_equals_eager_steps(weight_grads):
    """Seven AdamW steps on seven different batches: eager, and through CUDAGraphStep (two eager warm-up steps, a
    capture, a replay; then `reset`, which drops the graph and its static inputs, and again two eager steps, a capture, a
    replay). float32, so the two must agree to round-off; a replay that ignored its new batch or accumulated gradients
    across replays would not, nor would a second capture that read the first one's static inputs."""
    from condensation.cuda_graph import CUDAGraphStep

    batches = [{"input_ids": torch.randint(0, 4096, (1, 1100), device="cuda")} for _ in range(7)]
    models, losses = [], []
    for graphed in (False, True):
        model = _model(torch.float32, segment_length=256, checkpoint_cells=True, weight_grads=weight_grads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)

        def step(batch):
            loss = model(batch["input_ids"], labels=batch["input_ids"], return_logits=False).loss
            loss.backward()
            opt.step()
            return loss

        if graphed:
            run = CUDAGraphStep(step, opt, warmup=2)
        else:
            def run(batch):
                opt.zero_grad(set_to_none=True)
                return step(batch)
        out = []
        for i, b in enumerate(batches):
            if graphed and i == 4:
                assert run.graph is not None
                held = torch.cuda.memory_allocated()
                run.reset()
                freed = held - torch.cuda.memory_allocated()
                assert run.graph is None and freed > 0, freed
            out.append(run(b).item())
        if graphed:
            assert run.graph is not None  # captured again
        losses.append(out)
        models.append(model)
    print({"eager": losses[0], "graphed": losses[1], "freed_by_reset": freed})
    assert len(set(losses[1])) == 7  # each replay saw its own batch
    for a, b in zip(*losses):
        assert abs(a - b) < 1e-4 * abs(a)
    diff = max((p - q).abs().max().item() for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert diff < 1e-4, diff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cross_entropy_equals_torch(dtype):
    from condensation import kernels

    if not kernels._HAS_TRITON:
        pytest.skip("triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(300, 128256, device="cuda", generator=g)).to(dtype)
    targets = torch.randint(0, 128256, (300,), device="cuda", generator=g)
    targets[::7] = -100
    weights = torch.rand(300, device="cuda", generator=g)
    a, b = logits.clone(), logits.clone()
    ce = kernels.cross_entropy_grad_(a, targets, weights)
    ce_ref = kernels.cross_entropy_grad_torch_(b, targets, weights)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (ce - ce_ref).abs().max().item() < 1e-4 * ce_ref.abs().max().item()
    assert (a.float() - b.float()).abs().max().item() < tol * b.float().abs().max().item()
    assert a[::7].abs().max().item() == 0  # ignored rows: no gradient


def test_lm_head_gradient_adds_in_float32(monkeypatch):
    """The fused loss's lm-head gradient, acc += a @ b in one float32-accumulating GEMM (addmm with out_dtype where
    this torch has it), against float64, over three chunks as the loss adds them; then the sliced fallback."""
    from condensation import fast_train

    g = torch.Generator(device="cuda").manual_seed(0)
    chunks = [(torch.randn(4099, 512, device="cuda", generator=g).bfloat16(),
               torch.randn(512, 384, device="cuda", generator=g).bfloat16()) for _ in range(3)]
    ref = sum(a.double() @ b.double() for a, b in chunks)
    for fused in (True, False):
        monkeypatch.setattr(fast_train, "_ADDMM_OUT_DTYPE", [fused])  # restored after the test, passed or failed
        acc = torch.zeros(4099, 384, device="cuda")
        for a, b in chunks:
            fast_train._add_matmul_(acc, a, b)
        # the GEMM accumulating in float32 is exact to float32 round-off; the fallback rounds each product to bf16
        tol = 1e-5 if fast_train._ADDMM_OUT_DTYPE[0] else 1e-2
        assert (acc.double() - ref).abs().max().item() < tol * ref.abs().max().item(), fused
        print("out_dtype GEMM" if fast_train._ADDMM_OUT_DTYPE[0] else "sliced fallback", "used")


@pytest.mark.parametrize("weight_grads", ["deferred", "accumulate"])
def test_swiglu_gradients_in_place_as_close_as_the_chunked_autograd(weight_grads, monkeypatch):
    """Compiled pieces with a weight sink, the SwiGLU gradients chunked (one cell at a time): the one compiled kernel
    that writes them over gate and up, in bf16, is no further from the float32 run of the same weights than the
    chunk-by-chunk autograd loop it replaced (bf16 rounds differently in each: 0.8-1% apart over the whole model; each
    11.7% from float32 on an H200 in session 13)."""
    from condensation import fast_train

    monkeypatch.setattr(fast_train, "SWIGLU_GRAD_CHUNK_BYTES", 1)
    options = dict(weight_grads=weight_grads, compile_cells=True, segment_length=256)
    ids = torch.randint(0, 4096, (1, 1500), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    _, ref = _run(_model(torch.float32, **options), ids)
    model = _model(torch.bfloat16, **options)
    _, new = _run(model, ids)
    monkeypatch.setattr(fast_train, "_SWIGLU_IN_PLACE", [False])
    _, old = _run(model, ids)
    err_new, err_old = _rel(new, ref), _rel(old, ref)
    print(f"bf16 against float32: in place {err_new:.4f}, chunked autograd {err_old:.4f}")
    assert ref.abs().max() > 0 and err_new <= 1.2 * err_old, (err_new, err_old)


# the memory options (memory_sink_tokens, memory_norm="separate") on the fast paths, against their own references
OPTIONS = dict(memory_sink_tokens=4, memory_norm="separate")


def _options_model(dtype, **kw):
    model = _model(dtype, **OPTIONS, **kw)
    with torch.no_grad():  # memory norms apart from the input norms, so that using the wrong one would show
        g = torch.Generator(device="cuda").manual_seed(1)
        for layer in model.model.layers:
            w = layer.memory_layernorm.weight
            w.copy_(1 + 0.2 * torch.randn(w.shape, device="cuda", generator=g))
    return model


@pytest.fixture(scope="module")
def options_reference():
    return _reference(_options_model)


@pytest.mark.parametrize("variant", [dict(), dict(segment_attention="flash"), dict(segment_attention="flex"),
                                     dict(compile_cells=True), dict(compile_cells=True, checkpoint_group_steps=2),
                                     dict(weight_grads="deferred", compile_cells=True, checkpoint_group_steps=2),
                                     # bench-smollm2's case: per-step checkpoints in groups, accumulated weight
                                     # gradients, diagonals split into steps of 2 cells (4 layers here)
                                     dict(checkpoint_cells=True, checkpoint_group_steps=2, weight_grads="accumulate",
                                          max_step_cells=2),
                                     # the same with the layer weights stored stacked (not yet run on a GPU)
                                     dict(checkpoint_cells=True, checkpoint_group_steps=2, weight_grads="accumulate",
                                          max_step_cells=2, stacked_params=True),
                                     dict(compile_cells=True, checkpoint_group_steps=2, stacked_params=True)])
def test_memory_options_bf16_paths_as_close_as_the_reference(variant, options_reference):
    reason = attention_unavailable_reason(variant.get("segment_attention", "sdpa"), "cuda", backward=True)
    if reason:
        pytest.skip(reason)
    ids, (ref_logits, ref_grads), (base_logits, base_grads) = options_reference
    model = _options_model(torch.bfloat16, segment_length=256, **variant)
    logits, grads = _run(model, ids)
    fused = _fused_grads(model, ids)  # the training path: no logits
    err = {"variant": variant, "logits": _rel(logits, ref_logits), "grads": _rel(grads, ref_grads),
           "fused_grads": _rel(fused, ref_grads), "reference_bf16_logits": base_logits,
           "reference_bf16_grads": base_grads}
    print(err)
    assert err["logits"] < 2 * base_logits + 1e-3, err
    assert max(err["grads"], err["fused_grads"]) < 2 * base_grads + 1e-3, err
