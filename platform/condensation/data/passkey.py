"""The paper's passkey retrieval task (Appendix C), generated deterministically to an exact token length.

Text (paragraphs joined by a blank line, as Appendix C prints them; "repeat x times" = x filler sentences):

    {PASSKEY_INSTRUCTION}

    {filler sentences before}          <- omitted (with its blank line) when empty, i.e. depth 0

    The passkey is 9054. Remember it carefully. 9054 is the passkey.

    {filler sentences after}

    What is the passkey? The passkey is 9054

Exact length. Pieces are tokenized separately and concatenated: bos, instruction, each filler sentence
("\\n\\n" + sentence for the first of a paragraph, " " + sentence otherwise), "\\n\\n" + needle,
"\\n\\n" + question, " " + passkey, eos (train). Each piece starts where a pre-tokenizer splits anyway
(before "\\n" or a space-led word), so for byte-level BPE tokenizers this equals encoding the whole text,
and token counts add up exactly. The filler budget (total minus everything else) is spent in whole
sentences cycled through PASSKEY_FILLER's five sentences; the sentences before the needle are
round(depth * whole sentences that fit); the after paragraph takes the rest and its LAST sentence is cut
at a token boundary so that the total is exactly `total_tokens` (a partial filler sentence right before the
question, no padding). Depth is therefore the fraction of filler tokens before the needle, exact to one
sentence (about 6 tokens).

Answer. The answer tokens are the passkey's digits (+ eos in training); any whitespace-only token in front of
them (a space that the tokenizer keeps apart from digits, as the builtin tokenizer and Llama-3 do) belongs to
the prompt, so the evaluation prompt is exactly the training example minus its labelled tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray.data
from transformers import PreTrainedTokenizerBase

from .pipeline import IGNORE_INDEX, draw_length, encode_texts

PASSKEY_INSTRUCTION = (
    "There is a critical piece of information hidden within a large amount of irrelevant text. "
    "Your task is to locate it and remember it carefully. I will test your ability to recall this information."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The passkey is {passkey}. Remember it carefully. {passkey} is the passkey."
PASSKEY_QUESTION = "What is the passkey? The passkey is"
PARAGRAPH_BREAK = "\n\n"
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")


@dataclass(frozen=True)
class PasskeyTemplate:
    """Token ids of the fixed pieces, computed once per tokenizer and shipped to Ray tasks."""

    head: tuple[int, ...]                 # bos + instruction
    first_sentence: tuple[tuple[int, ...], ...]  # "\n\n" + sentence i (opens a paragraph)
    next_sentence: tuple[tuple[int, ...], ...]   # " " + sentence i (continues one)
    question: tuple[int, ...]             # "\n\n" + question
    eos_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PasskeyTemplate:
        pieces = encode_texts(tokenizer, [PASSKEY_INSTRUCTION, PARAGRAPH_BREAK + PASSKEY_QUESTION]
                              + [PARAGRAPH_BREAK + s for s in FILLER_SENTENCES]
                              + [" " + s for s in FILLER_SENTENCES])
        bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
        k = len(FILLER_SENTENCES)
        return cls(head=bos + tuple(pieces[0]), question=tuple(pieces[1]),
                   first_sentence=tuple(tuple(p) for p in pieces[2:2 + k]),
                   next_sentence=tuple(tuple(p) for p in pieces[2 + k:]), eos_id=tokenizer.eos_token_id)


def _paragraph(template: PasskeyTemplate, start: int, budget: int, max_sentences: int | None) -> list[int]:
    """Filler sentences from cycle index `start`, at most `budget` tokens (last one cut to fill it exactly
    when max_sentences is None; otherwise exactly `max_sentences` whole sentences)."""
    out: list[int] = []
    i = 0
    while len(out) < budget and (max_sentences is None or i < max_sentences):
        sentences = template.first_sentence if i == 0 else template.next_sentence
        out.extend(sentences[(start + i) % len(FILLER_SENTENCES)])
        i += 1
    return out[:budget]


def _whole_sentences(template: PasskeyTemplate, budget: int) -> int:
    """How many whole filler sentences fit in `budget` tokens as one paragraph."""
    n, used = 0, 0
    while True:
        sentences = template.first_sentence if n == 0 else template.next_sentence
        cost = len(sentences[n % len(FILLER_SENTENCES)])
        if used + cost > budget:
            return n
        used, n = used + cost, n + 1


def passkey_example(tokenizer: PreTrainedTokenizerBase, total_tokens: int, depth: float, passkey: str | int,
                    train: bool = True, template: PasskeyTemplate | None = None) -> dict:
    """One example: `input_ids` exactly `total_tokens` long (train) or its prompt part (eval).

    Returns input_ids, labels (-100 except the passkey digits and eos), answer, depth, needle_token_start,
    filler_tokens_before, filler_tokens (so a test or a plot can use the realised depth).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    answer = str(passkey)
    if not answer.isdigit():
        raise ValueError(f"passkey must be digits, got {answer!r}")
    template = template or PasskeyTemplate.from_tokenizer(tokenizer)
    needle, spaced_answer = encode_texts(tokenizer, [PARAGRAPH_BREAK + PASSKEY_NEEDLE.format(passkey=answer),
                                                     " " + answer])
    lead = _leading_whitespace_tokens(tokenizer, spaced_answer)
    answer_ids = spaced_answer[lead:] + ([template.eos_id] if template.eos_id is not None else [])
    prompt_tail = list(template.question) + spaced_answer[:lead]
    budget = total_tokens - len(template.head) - len(needle) - len(prompt_tail) - len(answer_ids)
    if budget < 0:
        raise ValueError(f"total_tokens={total_tokens} is too short for the passkey prompt "
                         f"(needs at least {total_tokens - budget})")
    n_before = round(depth * _whole_sentences(template, budget))
    before = _paragraph(template, 0, budget, n_before)
    after = _paragraph(template, n_before, budget - len(before), None)
    prompt = list(template.head) + before + needle + after + prompt_tail
    ids = prompt + answer_ids
    assert len(ids) == total_tokens, (len(ids), total_tokens)  # the budget arithmetic above guarantees it
    labels = [IGNORE_INDEX] * len(prompt) + answer_ids
    return {
        "input_ids": np.asarray(ids if train else prompt, dtype=np.int64),
        "labels": np.asarray(labels if train else [IGNORE_INDEX] * len(prompt), dtype=np.int64),
        "answer": answer,
        "depth": float(depth),
        "needle_token_start": len(template.head) + len(before),
        "filler_tokens_before": len(before),
        "filler_tokens": budget,
    }


def _leading_whitespace_tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> int:
    """How many leading tokens of " <digits>" decode to whitespace only (they go to the prompt)."""
    n = 0
    while n < len(ids) - 1 and not tokenizer.decode(ids[n:n + 1]).strip():
        n += 1
    return n


def needle_token_start(example: dict) -> int:
    """Token index where the needle paragraph (its "\\n\\n" included) starts in `input_ids`."""
    return int(example["needle_token_start"])


def row_passkey(seed: int, index: int) -> str:
    """The 4-digit passkey of row `index` (1000-9999, as in the paper's example), from (seed, index) only."""
    return str(np.random.default_rng([seed, index]).integers(1000, 10000))


def row_depth(seed: int, index: int, depths: Sequence[float] | None) -> float:
    """Cycle through `depths` (evaluation grids) or draw uniformly from [0, 1] (training)."""
    if depths:
        return float(depths[index % len(depths)])
    return float(np.random.default_rng([seed, index, 1]).random())


def row_length(seed: int, index: int, total_tokens: int, lengths: Sequence[int] | None, group_size: int) -> int:
    """The length of training row `index`: total_tokens, or with `lengths` one of them drawn per group of group_size
    consecutive rows (a micro-batch's worth, so that a batch's rows share it), from (seed, group) only."""
    if not lengths:
        return total_tokens
    return draw_length(lengths, seed, index // group_size, 2)


def _passkey_batch(batch: dict[str, np.ndarray], tokenizer: PreTrainedTokenizerBase, template: PasskeyTemplate,
                   total_tokens: int, seed: int, depths: Sequence[float] | None, train: bool,
                   lengths: Sequence[int] | None = None, group_size: int = 1) -> dict[str, np.ndarray]:
    ids = [int(i) for i in batch["id"]]
    sizes = [row_length(seed, i, total_tokens, lengths, group_size) for i in ids]
    rows = [passkey_example(tokenizer, n, row_depth(seed, i, depths), row_passkey(seed, i), train=train,
                            template=template) for i, n in zip(ids, sizes)]
    out = {key: np.asarray([r[key] for r in rows]) for key in rows[0] if key not in ("input_ids", "labels")}
    out["answer"] = np.asarray([r["answer"] for r in rows], dtype=object)
    # all rows of one call have the same length (train: total_tokens; eval: total minus the answer); rows of random
    # lengths are stored padded to total_tokens after their `length` (pipeline.uniform_length_batches cuts them)
    out["input_ids"] = np.stack([np.pad(r["input_ids"], (0, total_tokens - n)) if lengths else r["input_ids"]
                                 for r, n in zip(rows, sizes)])
    out["labels"] = np.stack([np.pad(r["labels"], (0, total_tokens - n), constant_values=IGNORE_INDEX) if lengths
                              else r["labels"] for r, n in zip(rows, sizes)])
    if lengths:
        out["length"] = np.asarray(sizes, dtype=np.int64)
    out["index"] = batch["id"].astype(np.int64)
    return out


def min_passkey_tokens(tokenizer: PreTrainedTokenizerBase, template: PasskeyTemplate | None = None) -> int:
    """A length every training example fits in: everything but filler, for the longest of a sample of passkeys, plus
    one filler sentence's worth of tokens (a tokenizer may spend a token more on some digits)."""
    template = template or PasskeyTemplate.from_tokenizer(tokenizer)
    big = 4096
    fixed = max(big - passkey_example(tokenizer, big, 0.0, key, template=template)["filler_tokens"]
                for key in (1000, 1111, 4567, 8080, 9999))
    return fixed + max(len(s) for s in template.next_sentence)


def passkey_dataset(tokenizer: PreTrainedTokenizerBase, total_tokens: int, n: int, seed: int,
                    depths: Sequence[float] | None = None, train: bool = True,
                    num_cpus: float = 0.25, lengths: Sequence[int] | None = None,
                    group_size: int = 1) -> ray.data.Dataset:
    """`n` examples as a Ray dataset; row i depends only on (seed, i), so any split or order reproduces it.

    Columns: input_ids, labels, answer, depth, needle_token_start, filler_tokens_before, filler_tokens, index.
    For training pass `pipeline.train_view(ds)` (input_ids, labels) to the trainer.

    lengths (training rows): each group of `group_size` consecutive rows is generated at one length drawn from
    `lengths` (`row_length`), stored padded to total_tokens, with a `length` column (`train_view(ds, with_length=True)`
    keeps it; the training loop cuts every micro-batch to one length, `pipeline.uniform_length_batches`).
    """
    if lengths is not None and (not train or not lengths or max(lengths) > total_tokens):
        raise ValueError(f"lengths {lengths} must be training lengths up to total_tokens={total_tokens}")
    template = PasskeyTemplate.from_tokenizer(tokenizer)
    # row ids come from the driver (from_items): ray.data.range's read tasks each ask for a whole CPU, which never
    # frees up on a 2-core box while two training workers hold 0.9 CPU each
    ids = ray.data.from_items([{"id": i} for i in range(n)], override_num_blocks=max(1, min(64, n // 256)))
    return ids.map_batches(
        _passkey_batch, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"tokenizer": tokenizer, "template": template, "total_tokens": total_tokens, "seed": seed,
                   "depths": tuple(depths) if depths else None, "train": train,
                   "lengths": tuple(lengths) if lengths else None, "group_size": group_size},
    )
