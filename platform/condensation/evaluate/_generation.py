"""One place where evaluation calls the model's own `generate`, so passkey and summarization decode alike.

The Condensation model cuts segments by position, so it refuses padded rows: every call here passes a batch of
equal-length prompts and an all-ones attention mask. (Without the explicit mask, transformers infers one from
`pad_token_id` and masks any prompt token that happens to equal it.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def model_device(model) -> torch.device:
    """The device of the model's weights; CPU for stubs without parameters."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def pad_token_id(tokenizer) -> int | None:
    """A pad id for generate's finished rows: the tokenizer's pad, else its eos."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Evaluate in eval mode and give the model back in the mode it came in (a trainer may call us mid-run)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def equal_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most batch_size rows that all share one length (no padding needed);
    order inside a length group follows the input order, so a result does not depend on other groups."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def generate_new_tokens(model, input_ids: torch.Tensor, tokenizer, **generate_kwargs) -> torch.Tensor:
    """Run `model.generate` on equal-length rows [B, P]; return only the generated tokens [B, <= max_new_tokens]."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), pad_token_id=pad_token_id(tokenizer))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    kwargs.update(generate_kwargs)
    with torch.inference_mode():
        out = model.generate(input_ids, **kwargs)
    out = out.sequences if hasattr(out, "sequences") else out
    return out[:, input_ids.shape[1] :].cpu()
