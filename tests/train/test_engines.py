"""The torch engine in-process (no Ray, one rank, CPU): the same updates as a plain torch loop, its CUDA-graph code
path (replayed eagerly here) equal to its eager one, a NaN never reaching the weights, and a checkpoint that
continues a run exactly. Its distributed behaviour (gloo all-reduce, restarts, MLflow) is in test_fit.py; the graphs
themselves on a GPU are in test_fit_gpu.py."""

import dataclasses

import pytest
import torch

from condensation.config import load_config
from condensation.train import engines
from condensation.train.model import build_model

SEQ = 32  # one segment of the debug model


def _cfg(*overrides):
    return load_config(overrides=["schedule.engine=torch", "schedule.num_workers=1", "schedule.per_worker_batch=1",
                                  "schedule.global_batch=1", "schedule.total_steps=4", f"data.seq_len={SEQ}",
                                  "optim.warmup_steps=1", *overrides])


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, SEQ), generator=g) for _ in range(n)]


def _engine(cfg, graph=False):
    torch.manual_seed(0)
    if graph:  # validation keeps cuda_graph to GPUs; the engine's own code path does not need one
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, cuda_graph=True))
    return engines.TorchEngine(cfg, build_model(cfg.model), torch.device("cpu"), world=1)


class EagerReplay:
    """CUDAGraphStep's interface without CUDA: the runner's zero_grad and static inputs, then the step function."""

    def __init__(self, step_fn, optimizer, warmup=2, zero_grad=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"  # the data loader's thread copies batches during capture
        self.step_fn, self.zero_grad, self.static = step_fn, zero_grad, None

    def __call__(self, batch):
        self.zero_grad()
        self.static = self.static or {k: v.clone() for k, v in batch.items()}
        for k, v in batch.items():
            self.static[k].copy_(v)
        return self.step_fn(self.static)


def test_matches_a_plain_torch_step_with_accumulation_and_clipping():
    # 2 micro-batches a step, a clip small enough to act; against loss / 2 backward, clip_grad_norm_, AdamW, cosine
    cfg = _cfg("schedule.global_batch=2", "optim.grad_clip=0.05", "schedule.total_steps=3")
    eng = _engine(cfg)
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    opt, sch = engines._optimizer_and_schedule(cfg, ref.parameters(), torch.device("cpu"))
    batches = _batches(6)
    for step in range(3):
        assert eng.lr == opt.param_groups[0]["lr"]
        for b in batches[2 * step: 2 * step + 2]:
            out = eng.forward_backward(b, b)
            eng.step()
            loss = ref(input_ids=b, labels=b, return_logits=False).loss
            (loss / 2).backward()
            torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=0)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
        opt.step()
        sch.step()
        opt.zero_grad()
    for p, q in zip(eng.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # the flat norm sums in another order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_code_path_equals_eager_and_a_nan_never_reaches_the_weights(monkeypatch, precision):
    # fp32 (AdamW on the model's weights, backward into the bucket) and bf16 with fp32 master weights (bf16 gradients
    # folded into the bucket); step 2's loss is NaN: its update is not applied, the run goes on
    from condensation import cuda_graph

    cfg = _cfg(f"schedule.precision={precision}", "debug.nan_at_step=2", "optim.warmup_steps=0")
    batches = _batches(4)

    def run(graph):
        monkeypatch.setattr(cuda_graph, "CUDAGraphStep", EagerReplay)
        eng = _engine(cfg, graph)
        assert (eng._grads_graph is not None) == graph
        start = [p.clone() for p in eng.opt_params]
        lrs, losses = [], []
        for step, b in enumerate(batches, 1):
            lrs.append(eng.lr)
            out = eng.forward_backward(b, b, poison=step == 2)
            losses.append(float(out.loss))
            if step == 2:  # the loop stops here; this test looks at the weights after the poisoned backward
                assert all(torch.equal(p, q) for p, q in zip(eng.opt_params, after_1))
                continue
            eng.step()
            if step == 1:
                after_1 = [p.clone() for p in eng.opt_params]
                assert not all(torch.equal(p, q) for p, q in zip(start, after_1))
        assert all(torch.equal(p, q.to(p.dtype)) for p, q in zip(eng.params, eng.opt_params))
        return lrs, losses, eng.opt_params

    lrs_e, losses_e, masters_e = run(False)
    lrs_g, losses_g, masters_g = run(True)
    assert lrs_e == lrs_g and lrs_e[0] == cfg.optim.lr > lrs_e[2]  # the graph path's comes from its device tensor
    assert torch.isnan(torch.tensor(losses_e[1])) and torch.isnan(torch.tensor(losses_g[1]))
    # the graph path's lr is a tensor, so AdamW's arithmetic differs in the last bit, which the bf16 copy of the
    # weights can round a whole bf16 step apart in the next forward
    tol = {"fp32": 1e-6, "bf16": 1e-4}[precision]
    assert losses_e[0] == losses_g[0]
    torch.testing.assert_close(torch.tensor(losses_e[2:]), torch.tensor(losses_g[2:]), rtol=tol, atol=0)
    for p, q in zip(masters_e, masters_g):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("weight_grads", ["autograd", "accumulate", "deferred"])
def test_stacked_params_train_as_unstacked(monkeypatch, precision, weight_grads):
    # model.overrides.stacked_params: the weight sinks add into the stacked parameters' .grad (the bucket's view in
    # fp32; a fresh one, folded and dropped, with bf16 master weights), eagerly and on the graph code path
    from condensation import cuda_graph

    monkeypatch.setattr(cuda_graph, "CUDAGraphStep", EagerReplay)
    batches = _batches(3)

    def run(stacked, graph):
        cfg = _cfg(f"schedule.precision={precision}", "optim.warmup_steps=0", "model.segment_length=8",
                   f"model.overrides.weight_grads={weight_grads}", "model.overrides.checkpoint_group_steps=2",
                   f"model.overrides.stacked_params={str(stacked).lower()}")
        eng = _engine(cfg, graph)
        assert hasattr(eng.module.model, "layer_stack") == stacked
        losses = []
        for b in batches:
            losses.append(float(eng.forward_backward(b, b).loss))
            eng.step()
        return torch.tensor(losses), eng.module.state_dict()

    losses, weights = run(False, False)
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]  # bf16: gradients summed in another order, rounded in bf16
    for graph in (False, True):
        l_on, w_on = run(True, graph)
        assert list(w_on) == list(weights)
        torch.testing.assert_close(l_on, losses, rtol=tol, atol=0)
        for name, t in weights.items():
            torch.testing.assert_close(w_on[name].float(), t.float(), rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoint_continues_the_run_exactly(tmp_path, precision):
    cfg = _cfg(f"schedule.precision={precision}")
    batches = _batches(3)
    whole = _engine(cfg)
    for b in batches:
        whole.forward_backward(b, b)
        whole.step()
    first = _engine(cfg)
    for b in batches[:2]:
        first.forward_backward(b, b)
        first.step()
    state = first.save(str(tmp_path), rank=0)
    assert state["engine"] == "torch" and list(state["files"]) == ["torch/state.pt"]
    assert first.save(str(tmp_path / "other"), rank=1) == {}  # only rank 0 writes
    resumed = _engine(cfg)
    resumed.load(str(tmp_path))
    assert resumed.lr == first.lr and resumed.scheduler.last_epoch == 2
    resumed.forward_backward(batches[2], batches[2])
    resumed.step()
    for p, q in zip(resumed.opt_params + list(resumed.module.parameters()),
                    whole.opt_params + list(whole.module.parameters())):
        assert torch.equal(p, q)
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"],
                       whole.optimizer.state_dict()["state"][0]["exp_avg"])


def _passkey_and_text(seq=SEQ):
    """A passkey-like micro-batch (loss on its last 5 tokens only) and a text one (loss everywhere)."""
    g = torch.Generator().manual_seed(2)
    ids_p, ids_t = torch.randint(0, 256, (1, seq), generator=g), torch.randint(0, 256, (1, seq), generator=g)
    labels_p = torch.full_like(ids_p, -100)
    labels_p[:, -5:] = ids_p[:, -5:]
    return (ids_p, labels_p), (ids_t, ids_t.clone())


def _by_hand(cfg, micro, weights):
    """Parameters after one AdamW step (the engines' optimizer, no clipping) on sum_i weights[i] x grad(micro[i]),
    from the same init; and that gradient."""
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    params = [p for p in ref.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    for (ids, labels), w in zip(micro, weights):
        loss = ref(input_ids=ids, labels=labels, return_logits=False).loss
        for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g, alpha=w)
    opt, _ = engines._optimizer_and_schedule(cfg, params, torch.device("cpu"))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in params], grads


def _by_hand_loss(cfg, ids, labels):
    """The loss of one micro-batch on the initial weights (what the engines report for the first step's rows)."""
    torch.manual_seed(0)
    with torch.no_grad():
        return build_model(cfg.model)(input_ids=ids, labels=labels, return_logits=False).loss


# eps comparable to the gradients' entries: AdamW's first step is then not the gradient's sign alone, so that a sum
# instead of a mean (or a text micro-batch weighted apart) moves the weights differently
REPLAY = ["schedule.replay_micro_batches=1", "optim.grad_clip=0", "optim.eps=1e-3", "optim.warmup_steps=0",
          "schedule.precision=fp32"]


def _weighted(w):
    """The step's weights of the passkey and the text micro-batch at replay weight w: (1, w) / (1 + w)."""
    return [1 / (1 + w), w / (1 + w)]


def _tells_apart(params, cfg, micro, w):
    """The test can tell: a sum instead of a mean, or (w != 1) the weight ignored, moves the weights elsewhere."""
    for other in [[1.0, 1.0]] + ([[0.5, 0.5]] if w != 1 else []):
        moved, _ = _by_hand(cfg, micro, other)
        assert max((p.detach() - q).abs().max() for p, q in zip(params, moved)) > 1e-4, other


# replay_weight 1: the plain mean (each micro-batch 1/2); 0.25: the passkey micro-batch 0.8, the text one 0.2
@pytest.mark.parametrize("w", [1.0, 0.25])
def test_torch_engine_replay_update_follows_the_mean_of_passkey_and_text_gradients(w):
    cfg = _cfg(*REPLAY, f"schedule.replay_weight={w}")
    assert cfg.schedule.grad_accum == 1 and cfg.schedule.micro_batches == 2
    micro = _passkey_and_text()
    eng = _engine(cfg)
    for i, (ids, labels) in enumerate(micro):
        out = eng.forward_backward(ids, labels, replay=i == 1)
        # the reported loss is the micro-batch's own, unweighted
        torch.testing.assert_close(out.loss, _by_hand_loss(cfg, ids, labels), rtol=1e-6, atol=0)
        if i == 1:  # the step's whole gradient, before the update: the (weighted) mean of the micro-batches' gradients
            want_params, mean = _by_hand(cfg, micro, _weighted(w))
            # 0.8 and 0.2 scale each loss before its backward here, each gradient after it by hand: fp32 rounding apart
            atol = 1e-8 if w == 1 else 1e-7
            for v, g in zip(eng.grad_views, mean):
                torch.testing.assert_close(v, g, rtol=1e-5, atol=atol)
        eng.step()
    for p, q in zip(eng.params, want_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)
    _tells_apart(eng.params, cfg, micro, w)


@pytest.fixture(scope="module")
def gloo_world_of_one():
    """torch.distributed with one gloo rank in this process, as DeepSpeed needs; torn down after the module's tests
    (one for all of them: DeepSpeed keeps its groups of the first, and a second world would not have them)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                     "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


@pytest.mark.parametrize("w", [1.0, 0.25])
def test_deepspeed_engine_replay_update_follows_the_mean_of_passkey_and_text_gradients(gloo_world_of_one, w):
    cfg = _cfg(*REPLAY, "schedule.engine=deepspeed", f"schedule.replay_weight={w}")
    micro = _passkey_and_text()
    torch.manual_seed(0)
    eng = engines.DeepSpeedEngine(cfg, build_model(cfg.model), torch.device("cpu"))
    assert eng.resolved["deepspeed_resolved"]["gradient_accumulation_steps"] == 2
    start = [p.detach().clone() for p in eng.module.parameters()]
    out = eng.forward_backward(*micro[0])
    torch.testing.assert_close(out.loss, _by_hand_loss(cfg, *micro[0]), rtol=1e-6, atol=0)  # unweighted
    eng.step()
    assert all(torch.equal(p, q) for p, q in zip(eng.module.parameters(), start))  # not at the boundary yet
    out = eng.forward_backward(*micro[1], replay=True)
    torch.testing.assert_close(out.loss, _by_hand_loss(cfg, *micro[1]), rtol=1e-6, atol=0)
    eng.step()
    want, _ = _by_hand(cfg, micro, _weighted(w))
    for p, q in zip(eng.module.parameters(), want):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)
    _tells_apart(list(eng.module.parameters()), cfg, micro, w)


def test_deepspeed_engine_refuses_stacked_params():
    # config.validate refuses the pair first; a model built elsewhere is refused before ZeRO flattens its parameters
    from condensation.config import ConfigError

    cfg = load_config(overrides=["schedule.total_steps=4", f"data.seq_len={SEQ}", "optim.warmup_steps=1"])
    model = build_model(dataclasses.replace(cfg.model, overrides={"stacked_params": True}))
    with pytest.raises(ConfigError, match=r"^model\.overrides\.stacked_params: needs schedule\.engine=torch"):
        engines.DeepSpeedEngine(cfg, model, torch.device("cpu"))
