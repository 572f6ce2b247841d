"""A whole training step (forward, backward, optimizer step) captured once as a CUDA graph and replayed.

Why: at batch 1 a Condensation step is many small kernels (a few per cell, ~11 wavefront diagonals at 4K tokens,
~2,000 at 1M), and the host time to launch them, plus Python and autograd bookkeeping, is longer than the GPU time
they take. Captured once, a step is one graph launch. This is PyTorch's "whole network capture"
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture), wrapped so that every call is a real
training step on the batch it is given:

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, capturable=True)

    def step(batch):
        loss = model(batch["input_ids"], labels=batch["labels"], return_logits=False).loss
        loss.backward()
        opt.step()
        return loss

    graphed = CUDAGraphStep(step, opt)
    for batch in loader:            # fixed shapes; each batch's tensors are copied into the graph's inputs
        loss = graphed(batch)       # the first `warmup` calls run eagerly, the next one captures, then replays

Rules of a captured step: fixed shapes and dtypes, no host synchronisation inside (`.item()`, data-dependent
shapes), the optimizer built with `capturable=True`, and a learning rate that is a constant or a tensor updated in
place. The model code in this package is capture-safe. The returned loss is the graph's own output tensor: it is
overwritten by the next call, so clone it to keep it.

A step may also be split over several graphs replayed in turn (the training engine's forward + backward, then its
update): `zero_grad` says what to clear before the eager and captured calls (a no-op for a part whose gradients
must survive it), and `capture_error_mode="thread_local"` lets other threads of the process (a data loader copying
the next batch onto the GPU) keep using CUDA while this one captures.
"""

from __future__ import annotations

from typing import Callable

import torch


class CUDAGraphStep:
    def __init__(self, step_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], optimizer: torch.optim.Optimizer,
                 warmup: int = 2, zero_grad: Callable[[], None] | None = None, capture_error_mode: str = "global"):
        for i, group in enumerate(optimizer.param_groups):
            if not group.get("capturable", False):
                raise ValueError(f"optimizer param_groups[{i}]: build the optimizer with capturable=True to capture "
                                 "its step in a CUDA graph")
        if warmup < 1:
            raise ValueError(f"warmup: at least one eager step must run before capture (got {warmup})")
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"capture_error_mode: 'global', 'thread_local' or 'relaxed', got {capture_error_mode!r}")
        self.step_fn, self.optimizer, self.warmup = step_fn, optimizer, warmup
        # gradients set to None before each call are allocated by backward (inside the graph's pool once captured)
        self.zero_grad = zero_grad or (lambda: optimizer.zero_grad(set_to_none=True))
        self.capture_error_mode = capture_error_mode
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            # eager steps on a side stream, as capture requires (lazy state such as optimizer moments and cuBLAS
            # workspaces is created here, outside the graph)
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self.zero_grad()
                loss = self.step_fn(batch)
            torch.cuda.current_stream().wait_stream(self._stream)
            return loss
        if self.graph is None:
            self._capture(batch)
        else:
            self._load(batch)
        self.graph.replay()
        return self.static_loss

    def _load(self, batch: dict[str, torch.Tensor]) -> None:
        if batch.keys() != self.static_batch.keys():
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured {sorted(self.static_batch)}")
        for key, value in batch.items():
            static = self.static_batch[key]
            if value.shape != static.shape or value.dtype != static.dtype:
                raise ValueError(f"batch[{key!r}]: {tuple(value.shape)} {value.dtype} differs from the captured "
                                 f"{tuple(static.shape)} {static.dtype}; a CUDA graph replays fixed shapes")
            static.copy_(value, non_blocking=True)

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        self.static_batch = {k: v.detach().clone() for k, v in batch.items()}
        # gradients set to None before capture are allocated inside the graph's pool and written, not accumulated,
        # on every replay
        self.zero_grad()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # captured on the eager steps' own side stream, not torch.cuda.graph's default capture stream: cuBLAS keeps one
        # workspace per (handle, stream) in the caching allocator (up to 32 MiB each on Hopper), and a second stream held a
        # second one through every replay, inside the peak an eager step does not have
        self._stream = self._stream or torch.cuda.Stream()
        with torch.cuda.graph(self.graph, stream=self._stream, capture_error_mode=self.capture_error_mode):
            self.static_loss = self.step_fn(self.static_batch)

    def reset(self) -> None:
        """Frees the captured graph, its memory pool and the static inputs; the next call warms up and captures again.
        A graph that holds an NCCL collective must be freed before the process group is destroyed, or the destroy
        waits (pytorch/pytorch#115388: Ray Train's shutdown of a 2-GPU run timed out after 30 s)."""
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
        self.graph = self.static_batch = self.static_loss = None
        self.calls = 0
