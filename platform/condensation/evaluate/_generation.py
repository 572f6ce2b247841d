"""One place where evaluation calls the model's own `generate`, so passkey and summarization decode alike.

The Condensation model cuts segments by position, so it refuses padded rows: every call for it passes a batch of
equal-length prompts and an all-ones attention mask. (Without the explicit mask, transformers infers one from
`pad_token_id` and masks any prompt token that happens to equal it.) A plain transformers model (a full-attention
Llama baseline, an instruction model) takes left-padded rows with their mask instead (`left_pad`).
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


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in order of length (stable), cut into batches of at most batch_size rows: rows of near-equal length
    share a left-padded batch, so little of it is padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids left-padded to the longest: (input_ids [B, P], attention_mask [B, P], 0 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def generate_new_tokens(model, input_ids: torch.Tensor, tokenizer, attention_mask: torch.Tensor | None = None,
                        **generate_kwargs) -> torch.Tensor:
    """Run `model.generate` on rows [B, P] (equal-length unless `attention_mask` marks left padding); return only
    the generated tokens [B, <= max_new_tokens]."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    kwargs = dict(attention_mask=mask, pad_token_id=pad_token_id(tokenizer))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    kwargs.update(generate_kwargs)
    with torch.inference_mode():
        out = model.generate(input_ids, **kwargs)
    out = out.sequences if hasattr(out, "sequences") else out
    return out[:, input_ids.shape[1] :].cpu()
