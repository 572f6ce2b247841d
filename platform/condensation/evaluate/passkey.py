"""Passkey retrieval accuracy over a grid of (total length, needle depth), as the paper's Fig. 8.

Each cell gets `n_per_cell` prompts from the data layer's generator (the answer held out), the model answers by
greedy decoding with its own `generate` (the path users will run, cache and all, not a teacher-forced forward),
and the first digits it produces are compared with the passkey: exact match of all digits, and per-digit
accuracy (position by position), which moves long before exact match does and so shows early learning.

Passkeys are drawn per cell from `(seed, length, depth)`, so a cell's prompts do not depend on which other
lengths or depths are in the grid: stage k and stage k+1 of a curriculum are scored on the same prompts.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._generation import equal_length_batches, eval_mode, generate_new_tokens
from ._records import JsonRecord

ExampleFn = Callable[..., dict]
"""`example_fn(tokenizer, total_tokens, depth, passkey, train=False) -> {"input_ids": int array, "answer": str, ...}`"""

_DIGITS = re.compile(r"\d(?: ?\d)*")  # digits, allowing a decoder that puts single spaces between digit tokens


def parse_digits(text: str) -> str:
    """The first run of digits in generated text ('' if none): ' 9054. Remember' -> '9054', '9 0 5 4' -> '9054'."""
    m = _DIGITS.search(text)
    return "" if m is None else m.group(0).replace(" ", "")


def digit_accuracy(prediction: str, answer: str) -> float:
    """Fraction of the answer's digits predicted at their position; missing digits count as wrong."""
    if not answer:
        raise ValueError("empty answer")
    return sum(p == a for p, a in zip(prediction, answer)) / len(answer)


def length_label(n: int) -> str:
    """2048 -> '2K', 65536 -> '64K', 300 -> '300' (panel titles)."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def depth_key(d: float) -> str:
    """Depth as it appears in metric names: 0.5 -> '0.50'; finer depths keep their digits (0.125 -> '0.125')."""
    s = f"{d:.2f}"
    return s if abs(float(s) - d) < 1e-9 else f"{d:.6f}".rstrip("0")


def _default_example_fn(tokenizer) -> ExampleFn:
    """The data layer's generator with its token template built once for this tokenizer (not once per prompt).
    Imported lazily: the data layer imports Ray, and a custom example_fn must not need it."""
    from condensation.data.passkey import PasskeyTemplate, passkey_example

    return functools.partial(passkey_example, template=PasskeyTemplate.from_tokenizer(tokenizer))


@dataclass
class PasskeyGrid(JsonRecord):
    """Accuracy per (length, depth) cell. Arrays are [len(lengths), len(depths)]; `examples` keeps what the model
    said for every prompt (small: a few ints and strings each), so a surprising cell can be read, not guessed."""

    lengths: list[int]
    depths: list[float]
    exact: np.ndarray
    digit: np.ndarray
    counts: np.ndarray
    examples: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lengths = [int(n) for n in self.lengths]
        self.depths = [float(d) for d in self.depths]
        shape = (len(self.lengths), len(self.depths))
        self.exact = np.asarray(self.exact, dtype=np.float64).reshape(shape)
        self.digit = np.asarray(self.digit, dtype=np.float64).reshape(shape)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(shape)

    # --- reading

    def _mean(self, values: np.ndarray) -> float:
        n = self.counts.sum()
        return float((values * self.counts).sum() / n) if n else math.nan

    @property
    def mean_exact(self) -> float:
        return self._mean(self.exact)

    @property
    def mean_digit(self) -> float:
        return self._mean(self.digit)

    def cell(self, length: int, depth: float) -> dict[str, float]:
        i, j = self.lengths.index(int(length)), self.depths.index(float(depth))
        return {"exact": float(self.exact[i, j]), "digit": float(self.digit[i, j]), "count": int(self.counts[i, j])}

    def summary(self) -> dict[int, dict[str, float]]:
        """Per total length: mean exact and per-digit accuracy over depths (weighted by prompts), and the count."""
        out = {}
        for i, n in enumerate(self.lengths):
            c = self.counts[i]
            tot = c.sum()
            out[n] = {
                "exact": float((self.exact[i] * c).sum() / tot) if tot else math.nan,
                "digit": float((self.digit[i] * c).sum() / tot) if tot else math.nan,
                "count": int(tot),
            }
        return out

    def to_metrics(self, prefix: str = "passkey") -> dict[str, float]:
        """Flat MLflow-safe metrics: `{prefix}/{exact,digit}/len_2048/depth_0.50`, `.../len_2048/mean`, `.../mean`."""
        metrics: dict[str, float] = {}
        summary = self.summary()
        for kind, values in (("exact", self.exact), ("digit", self.digit)):
            for i, n in enumerate(self.lengths):
                for j, d in enumerate(self.depths):
                    if self.counts[i, j]:
                        metrics[f"{prefix}/{kind}/len_{n}/depth_{depth_key(d)}"] = float(values[i, j])
                if summary[n]["count"]:
                    metrics[f"{prefix}/{kind}/len_{n}/mean"] = summary[n][kind]
            if self.counts.sum():
                metrics[f"{prefix}/{kind}/mean"] = self._mean(values)
        return metrics

    def format_table(self, metric: str = "exact") -> str:
        """A Markdown table (lengths x depths, plus the per-length mean) for logs and READMEs."""
        values = getattr(self, metric)
        head = "| length | " + " | ".join(depth_key(d) for d in self.depths) + " | mean |"
        rule = "|---" * (len(self.depths) + 2) + "|"
        rows = [
            f"| {length_label(n)} | " + " | ".join(f"{v:.2f}" for v in values[i]) + f" | {self.summary()[n][metric]:.2f} |"
            for i, n in enumerate(self.lengths)
        ]
        return "\n".join([head, rule, *rows])

    # --- storage

    def to_dict(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "depths": self.depths,
            "exact": self.exact.tolist(),
            "digit": self.digit.tolist(),
            "counts": self.counts.tolist(),
            "examples": self.examples,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PasskeyGrid":
        return cls(d["lengths"], d["depths"], d["exact"], d["digit"], d["counts"], d.get("examples", []), d.get("meta", {}))




def cell_passkeys(seed: int, length: int, depth: float, n: int, digits: int) -> list[int]:
    """The n passkeys of one cell: `digits` digits, no leading zero (so int and str forms agree)."""
    rng = np.random.default_rng([seed, int(length), int(round(float(depth) * 1_000_000))])
    return [int(x) for x in rng.integers(10 ** (digits - 1), 10**digits, size=n)]


def passkey_grid(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_per_cell: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    *,
    digits: int = 4,
    example_fn: ExampleFn | None = None,
    meta: dict[str, Any] | None = None,
) -> PasskeyGrid:
    """Greedy passkey accuracy of `model` per (total length, depth) cell.

    model: anything with `generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False, ...)`
        returning prompt + new tokens (a transformers `GenerationMixin` model such as `CondensationForCausalLM`).
    example_fn: builds one eval prompt (answer held out); default `condensation.data.passkey.passkey_example`.
        The truth is the example's `answer`, so the data layer alone decides how a passkey is written.
    batch_size: rows per `generate` call; only prompts of equal token length share a call (no padding).
    meta: stored with the grid (e.g. {"trained_length": 2048, "stage": "2K"}).
    """
    example_fn = example_fn or _default_example_fn(tokenizer)
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    exact = np.zeros((len(lengths), len(depths)))
    digit = np.zeros_like(exact)
    counts = np.zeros(exact.shape, dtype=np.int64)
    examples: list[dict[str, Any]] = []
    bar = tqdm(total=len(lengths) * len(depths) * n_per_cell, desc="passkey grid", disable=not progress, leave=False)
    with eval_mode(model):
        for i, total in enumerate(lengths):
            for j, depth in enumerate(depths):
                rows = [
                    example_fn(tokenizer, total, depth, key, train=False)
                    for key in cell_passkeys(seed, total, depth, n_per_cell, digits)
                ]
                prompts = [np.asarray(r["input_ids"], dtype=np.int64).reshape(-1) for r in rows]
                answers = [re.sub(r"\D", "", str(r["answer"])) for r in rows]
                for batch in equal_length_batches([len(p) for p in prompts], batch_size):
                    ids = torch.from_numpy(np.stack([prompts[k] for k in batch]))
                    max_new = max(len(answers[k]) for k in batch) + 1
                    new = generate_new_tokens(model, ids, tokenizer, max_new_tokens=max_new, do_sample=False)
                    for k, tokens in zip(batch, new.tolist()):
                        text = tokenizer.decode(tokens, skip_special_tokens=True)
                        pred = parse_digits(text)
                        ok, acc = pred == answers[k], digit_accuracy(pred, answers[k])
                        exact[i, j] += ok
                        digit[i, j] += acc
                        counts[i, j] += 1
                        examples.append({"length": total, "depth": depth, "prompt_tokens": len(prompts[k]),
                                         "answer": answers[k], "prediction": pred, "text": text})
                    bar.update(len(batch))
                exact[i, j] /= max(counts[i, j], 1)
                digit[i, j] /= max(counts[i, j], 1)
                bar.set_postfix(len=total, depth=f"{depth:.2f}", exact=f"{exact[i, j]:.2f}")
    bar.close()
    info = {"seed": seed, "n_per_cell": n_per_cell, "digits": digits, **(meta or {})}
    return PasskeyGrid(lengths, depths, exact, digit, counts, examples, info)
