"""Long-context language modelling: next-token loss by token position over windows of held-out real text.

The question a long-context model must answer: does the loss keep falling (or at least stay flat) as the context
grows past what the model was trained on? A full-attention Llama beyond its trained RoPE range gets worse; a
Condensation model should keep using its memory. One window of `length` tokens gives, at every position t, the
cross-entropy of predicting token t from tokens 0..t-1; averaged over windows and over bins of `bin_tokens`
positions, that is a `LossCurve`.

    from condensation.evaluate.long_context import loss_by_position, token_windows
    windows = token_windows(tokenizer, "heldout.jsonl", length=65536, n=8)        # int64 [8, 65536]
    curve = loss_by_position(model, windows, bin_tokens=512, name="Condensation l=512")
    print(curve.format_table()); curve.perplexity(0, 2048)

The logits are never materialised for a whole window ([65536, 128256] floats would be 32 GiB): the base model
gives the final-norm hidden states, and the lm-head + float32 cross-entropy run over chunks of positions.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._generation import eval_mode, model_device
from ._records import JsonRecord
from .passkey import length_label

TEXT_SUFFIXES = (".jsonl", ".json")


# ----------------------------------------------------------------------------------------------------------------
# Text -> token windows


def text_files(source: str | Path) -> list[Path]:
    """The .jsonl/.json files of `source` (a file, or a folder searched recursively, in sorted order)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{source}: no .jsonl/.json files there")
    return files


def read_documents(source: str | Path, text_field: str = "text") -> tuple[list[str], int]:
    """Every document of a jsonl file or folder, in file order (one JSON object a line, the text in `text_field`),
    and how many non-blank lines were skipped (not JSON, no string `text_field`, or empty text)."""
    docs, skipped = [], 0
    for path in text_files(source):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                text = row.get(text_field) if isinstance(row, dict) else None
                if isinstance(text, str) and text.strip():
                    docs.append(text)
                else:
                    skipped += 1
    return docs, skipped


def _encode(tokenizer, texts: list[str], batch: int = 256) -> list[np.ndarray]:
    """bos + text ids per document (the layout the model reads in pretraining; eos is placed by the caller)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out = []
    for i in range(0, len(texts), batch):
        part = texts[i : i + batch]
        if backend is not None:  # the Rust tokenizer directly: the same ids without the Python wrapper's overhead
            ids = [e.ids for e in backend.encode_batch(part, add_special_tokens=False)]
        else:
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in part]
        out += [np.asarray(([bos] if bos is not None else []) + list(x), dtype=np.int64) for x in ids]
    return out


def token_windows(tokenizer, source: str | Path, length: int, n: int, seed: int = 0, *, text_field: str = "text",
                  return_info: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """`n` windows of exactly `length` tokens of real text from a jsonl file or folder: int64 [n, length].

    Documents are tokenized as bos + text. Documents of at least `length` tokens are preferred: each holds
    len // length non-overlapping windows at offsets 0, length, 2 * length, ... (so a document's first window
    starts at its bos, and position t of the curve means "t tokens into a document"). The seed shuffles the
    documents; windows are taken one per document first, a document's second window only when every long
    document has given one, and so on.

    When the long documents hold fewer than `n` windows, all documents are concatenated in file order, separated
    by eos, and `n` of the stream's non-overlapping windows are drawn by the seed; a `UserWarning` says so, and
    `info["concatenated"]` is True. Not enough text even then: a ValueError naming the source.

    return_info: also return a dict (source, documents, skipped_rows, tokens, long_documents, concatenated,
        `windows` as [document index or -1, token offset] per row) for the record of an evaluation.
    """
    if length < 2:
        raise ValueError(f"length must be at least 2 tokens, got {length}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    texts, skipped = read_documents(source, text_field)
    if not texts:
        raise ValueError(f"{source}: no documents with a non-empty string field {text_field!r} "
                         f"({skipped} rows skipped)")
    docs = _encode(tokenizer, texts)
    total = int(sum(len(d) for d in docs))
    rng = np.random.default_rng(seed)
    slots = [len(d) // length for d in docs]  # whole windows per document
    long_docs = [i for i, k in enumerate(slots) if k > 0]
    info: dict[str, Any] = {"source": str(source), "text_field": text_field, "documents": len(docs),
                            "skipped_rows": skipped, "tokens": total, "long_documents": len(long_docs),
                            "length": int(length), "n": int(n), "seed": int(seed)}
    if sum(slots) >= n:
        order = [long_docs[i] for i in rng.permutation(len(long_docs))]
        picks: list[tuple[int, int]] = []
        k = 0
        while len(picks) < n:  # round k takes the k-th window of every document that has one
            picks += [(i, k * length) for i in order if k < slots[i]][: n - len(picks)]
            k += 1
        rows = [docs[i][o : o + length] for i, o in picks]
        info["concatenated"] = False
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        sep = [np.asarray([eos], dtype=np.int64)] if eos is not None else []
        stream = np.concatenate([part for d in docs for part in [d, *sep]])
        available = len(stream) // length
        if available < n:
            raise ValueError(
                f"{source}: not enough text for {n} windows of {length} tokens: {len(docs)} documents hold "
                f"{len(stream)} tokens (with eos between documents), {available} whole windows; give more text, "
                f"fewer windows or a shorter length")
        chosen = np.sort(rng.choice(available, size=n, replace=False))
        picks = [(-1, int(c) * length) for c in chosen]
        rows = [stream[o : o + length] for _, o in picks]
        info["concatenated"] = True
        why = "no document is" if not long_docs else f"only {len(long_docs)} documents are"
        warnings.warn(f"{source}: {why} {length} tokens long (with bos); the {n} windows come from its "
                      f"{len(docs)} documents concatenated in file order, separated by eos", stacklevel=2)
    info["windows"] = [[int(i), int(o)] for i, o in picks]
    windows = np.stack(rows).astype(np.int64)  # [n, length]
    return (windows, info) if return_info else windows


# ----------------------------------------------------------------------------------------------------------------
# The curve


def slug(name: str) -> str:
    """A display name as it appears in metric names: 'Condensation l=512' -> 'condensation-l512'."""
    s = re.sub(r"[^a-z0-9.]+", "-", name.lower().replace("=", "")).strip("-")
    return s or "model"


def position_ranges(length: int, bin_tokens: int) -> list[tuple[int, int]]:
    """Octaves of token positions on the bin grid: [0, b), [b, 2b), [2b, 4b), ... up to `length`, the last range
    ending at `length` (b = bin_tokens). What a log-position table or metric summarises."""
    edges, e = [0], bin_tokens
    while e < length:
        edges.append(e)
        e *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class LossCurve(JsonRecord):
    """Mean next-token cross-entropy (nats) per bin of token positions, over `windows` windows of `length` tokens.

    Position t is the index of the predicted token: its loss is -log p(token t | tokens 0..t-1), so t is also the
    context it had. Bin b holds positions [b * bin_tokens, (b + 1) * bin_tokens) (the last bin may be shorter);
    position 0 is never predicted, so bin 0 has bin_tokens - 1 positions per window. `bin_count` is the number of
    predictions per bin (positions x windows); an empty bin's loss is NaN. `window_loss` is each window's mean.
    """

    name: str
    length: int
    bin_tokens: int
    bin_loss: list[float]
    bin_count: list[int]
    tokens: int
    loss: float
    window_loss: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bin_loss = [math.nan if v is None else float(v) for v in self.bin_loss]
        self.bin_count = [int(c) for c in self.bin_count]
        if len(self.bin_loss) != len(self.bin_count) or len(self.bin_loss) != math.ceil(self.length / self.bin_tokens):
            raise ValueError(f"LossCurve {self.name!r}: {len(self.bin_loss)} bin losses and {len(self.bin_count)} "
                             f"counts for {self.length} tokens in bins of {self.bin_tokens}")

    @property
    def bin_starts(self) -> list[int]:
        return [b * self.bin_tokens for b in range(len(self.bin_loss))]

    @property
    def windows(self) -> int:
        return len(self.window_loss)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def mean_loss(self, lo: int = 0, hi: int | None = None) -> float:
        """Mean loss over the predictions of positions [lo, hi) (hi default: the window's end). The range must lie
        on the bin grid (hi may also be the window's end): the curve keeps bins, not single positions."""
        hi = self.length if hi is None else int(hi)
        bt = self.bin_tokens
        if not (0 <= lo < hi <= self.length) or lo % bt or (hi % bt and hi != self.length):
            raise ValueError(f"token range [{lo}, {hi}) must lie within [0, {self.length}] on the {bt}-token bins")
        b0, b1 = lo // bt, math.ceil(hi / bt)
        count = sum(self.bin_count[b0:b1])
        if not count:
            return math.nan
        return sum(v * c for v, c in zip(self.bin_loss[b0:b1], self.bin_count[b0:b1]) if c) / count

    def perplexity(self, lo: int = 0, hi: int | None = None) -> float:
        """exp(mean loss) over positions [lo, hi) (the bin grid, as `mean_loss`)."""
        return math.exp(self.mean_loss(lo, hi))

    def ranges(self) -> list[dict[str, float]]:
        """Loss and perplexity per octave of positions (`position_ranges`)."""
        out = []
        for lo, hi in position_ranges(self.length, self.bin_tokens):
            loss = self.mean_loss(lo, hi)
            out.append({"lo": lo, "hi": hi, "loss": loss, "ppl": math.exp(loss) if not math.isnan(loss) else math.nan})
        return out

    def format_table(self) -> str:
        """A Markdown table of loss and perplexity per octave of positions, then the whole window."""
        rows = [f"| {length_label(r['lo'])}-{length_label(r['hi'])} | {r['loss']:.3f} | {r['ppl']:.2f} |"
                for r in self.ranges()]
        head = [f"{self.name}: {self.windows} windows of {length_label(self.length)} tokens",
                "| positions | loss | ppl |", "|---|---|---|"]
        return "\n".join([*head, *rows, f"| all | {self.loss:.3f} | {self.ppl:.2f} |"])

    # --- storage

    def to_dict(self) -> dict[str, Any]:
        nan_free = [None if math.isnan(v) else v for v in self.bin_loss]  # strict JSON has no NaN
        return {"name": self.name, "length": self.length, "bin_tokens": self.bin_tokens, "bin_loss": nan_free,
                "bin_count": self.bin_count, "tokens": self.tokens, "loss": self.loss,
                "window_loss": self.window_loss, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossCurve":
        return cls(d["name"], d["length"], d["bin_tokens"], d["bin_loss"], d["bin_count"], d["tokens"], d["loss"],
                   d.get("window_loss", []), d.get("meta", {}))




def format_curves_table(curves: Sequence[LossCurve]) -> str:
    """Perplexity of several models side by side: rows = octaves of positions (of the longest window), columns =
    curves; '-' where a curve's window does not reach."""
    longest = max(curves, key=lambda c: c.length)
    head = "| positions | " + " | ".join(c.name for c in curves) + " |"
    rule = "|---" * (len(curves) + 1) + "|"
    rows = []
    for lo, hi in position_ranges(longest.length, longest.bin_tokens):
        cells = []
        for c in curves:
            try:
                cells.append(f"{c.perplexity(lo, hi):.2f}")
            except ValueError:  # beyond this curve's window, or off its bin grid
                cells.append("-")
        rows.append(f"| {length_label(lo)}-{length_label(hi)} | " + " | ".join(cells) + " |")
    rows.append("| all | " + " | ".join(f"{c.ppl:.2f}" for c in curves) + " |")
    return "\n".join(["perplexity by token position", head, rule, *rows])


# ----------------------------------------------------------------------------------------------------------------
# Loss by position


def is_condensation(model) -> bool:
    """A `CondensationForCausalLM` (by its class: a Condensation model loaded from a Llama folder keeps the folder's
    `model_type` string in its config)."""
    from ..modeling import CondensationForCausalLM

    return isinstance(model, CondensationForCausalLM)


def model_label(model) -> str:
    """A default curve name: 'Condensation l=512' or '<model type> full attention'."""
    cfg = getattr(model, "config", None)
    if is_condensation(model):
        return f"Condensation l={cfg.segment_length}"
    return f"{getattr(cfg, 'model_type', type(model).__name__)} full attention"


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states [B, L, d] of a causal LM's base model, without its lm-head: a
    `CondensationForCausalLM`'s `model.model(ids)` returns them; a transformers Llama's base model returns an
    output whose `last_hidden_state` they are (no KV cache: nothing is generated afterwards)."""
    if is_condensation(model):
        return model.model(input_ids)
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def loss_by_position(
    model,
    windows: np.ndarray | torch.Tensor,
    bin_tokens: int = 512,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    *,
    name: str | None = None,
    chunk_tokens: int = 2048,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
) -> LossCurve:
    """Mean next-token cross-entropy per bin of positions over `windows` (int [N, L]), as a `LossCurve`.

    model: a `CondensationForCausalLM` or a transformers causal LM with `.model` (base) and `.lm_head`, e.g.
        `LlamaForCausalLM`; evaluated in its own dtype on `device` (default: where its weights are), in eval mode
        and under `torch.inference_mode`.
    batch_size: windows per forward; chunk_tokens: positions per lm-head + cross-entropy chunk (peak memory holds
        one [chunk_tokens, V] float32 logits block, 1 GiB at 2048 tokens and a 128K vocabulary).
    name: the curve's name (default `model_label(model)`); meta: stored with the curve.
    """
    ids_all = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor) else windows)
    if ids_all.ndim != 2 or ids_all.shape[1] < 2:
        raise ValueError(f"windows must be [N, L] token ids with L >= 2, got shape {tuple(ids_all.shape)}")
    if bin_tokens < 1 or batch_size < 1 or chunk_tokens < 1:
        raise ValueError(f"bin_tokens, batch_size and chunk_tokens must be positive, got "
                         f"{bin_tokens}, {batch_size}, {chunk_tokens}")
    vocab = model.lm_head.weight.shape[0]
    if int(ids_all.min()) < 0 or int(ids_all.max()) >= vocab:  # on CUDA an out-of-range id is a device assert
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                         f"[{int(ids_all.min())}, {int(ids_all.max())}]: is the tokenizer the model's?")
    n_win, length = ids_all.shape
    device = torch.device(device) if device is not None else model_device(model)
    from tqdm.auto import tqdm

    # sums in float64: millions of per-token losses added into one bin lose digits in float32
    pos_sum = torch.zeros(length, dtype=torch.float64, device=device)  # [L] summed over windows, by position
    window_sum = []
    bar = tqdm(total=n_win, desc=name or "loss by position", disable=not progress, leave=False)
    with eval_mode(model), torch.inference_mode():
        for b0 in range(0, n_win, batch_size):
            ids = ids_all[b0 : b0 + batch_size].to(device=device, dtype=torch.long)  # [B, L]
            hidden = final_hidden(model, ids)  # [B, L, d]
            for r in range(ids.shape[0]):
                total = torch.zeros((), dtype=torch.float64, device=device)
                # position p's hidden state predicts token p + 1: chunks over p in [0, L - 1)
                for c0 in range(0, length - 1, chunk_tokens):
                    c1 = min(c0 + chunk_tokens, length - 1)
                    logits = model.lm_head(hidden[r, c0:c1])  # [c, V]
                    if logits.dtype in (torch.bfloat16, torch.float16):  # cross-entropy in at least float32
                        logits = logits.float()
                    ce = F.cross_entropy(logits, ids[r, c0 + 1 : c1 + 1], reduction="none").double()  # [c]
                    pos_sum[c0 + 1 : c1 + 1] += ce
                    total += ce.sum()
                window_sum.append(total)
            del hidden
            bar.update(ids.shape[0])
    bar.close()
    pos_sum = pos_sum.cpu().numpy()
    n_bins = math.ceil(length / bin_tokens)
    bin_sum = np.zeros(n_bins)
    bin_count = np.zeros(n_bins, dtype=np.int64)
    np.add.at(bin_sum, np.arange(1, length) // bin_tokens, pos_sum[1:])  # position 0 is never predicted
    np.add.at(bin_count, np.arange(1, length) // bin_tokens, n_win)
    bin_loss = np.divide(bin_sum, bin_count, out=np.full(n_bins, np.nan), where=bin_count > 0)
    predictions = n_win * (length - 1)
    window_loss = [float(s) / (length - 1) for s in torch.stack(window_sum).cpu().tolist()]
    info = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(device),
            **(meta or {})}
    return LossCurve(name or model_label(model), int(length), int(bin_tokens), bin_loss.tolist(), bin_count.tolist(),
                     predictions, float(pos_sum[1:].sum() / predictions), window_loss, info)
