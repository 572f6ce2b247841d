"""Stand-ins for the evaluation tests (imported by name, so kept out of conftest.py, whose module name other test
folders share): a character tokenizer, a passkey prompt builder in the paper's format (the
data layer's real one is used when it exists, see test_eval_passkey.py), and stub "models" whose `generate`
reads the passkey out of the prompt and answers right, wrong, or partly right on purpose."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

CHARS = "\x00\x01\x02" + "".join(chr(c) for c in range(32, 127)) + "\n"


class CharTokenizer:
    """One token per character; ids 0/1/2 are pad/eos/bos. Small enough for the 'debug' model's 512 vocab."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    all_special_ids = [0, 1, 2]

    def __init__(self) -> None:
        self.ids = {c: i for i, c in enumerate(CHARS)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + [self.ids[c] for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        # ids past the characters (a random model's vocab is larger) decode to a non-digit placeholder
        return "".join(CHARS[i] if i < len(CHARS) else "\u00a7" for i in ids
                       if not (skip_special_tokens and i in self.all_special_ids))


INSTRUCTION = "Find the passkey. "
FILLER = "The grass is green. "
QUESTION = " What is the passkey? The passkey is"


def toy_passkey_example(tokenizer, total_tokens: int, depth: float, passkey, train: bool = False) -> dict:
    """The paper's layout in characters: instruction, filler, needle at `depth`, filler, question. As the data
    layer's: the prompt is total_tokens minus the answer (' 1234') long when not training."""
    answer = str(passkey)
    needle = f" The passkey is {answer}. Remember it. "
    n_fill = total_tokens - len(INSTRUCTION) - len(needle) - len(QUESTION) - (len(answer) + 1)
    assert n_fill >= 0, f"total_tokens {total_tokens} too short"
    filler = (FILLER * (n_fill // len(FILLER) + 1))[:n_fill]
    cut = int(round(depth * n_fill))
    text = INSTRUCTION + filler[:cut] + needle + filler[cut:] + QUESTION
    ids = tokenizer.encode(text)
    if train:
        ids = ids + tokenizer.encode(" " + answer)
    return {"input_ids": np.asarray(ids, dtype=np.int64), "answer": answer, "depth": depth,
            "needle_token_start": len(INSTRUCTION) + cut}


NEEDLE = re.compile(r"passkey is (\d+)\.")


class OracleModel(nn.Module):
    """A `generate` that finds the passkey in each prompt and answers according to `mode`:
    right | wrong (every digit +1 mod 10) | half (first half of the digits right) |
    shallow (right only if the needle is in the first 40% of the filler: toy prompts only) | short (right only if prompt < limit).
    Records every call's input shape and keyword arguments."""

    def __init__(self, tokenizer, mode: str = "right", limit: int = 100) -> None:
        super().__init__()
        self.tokenizer, self.mode, self.limit = tokenizer, mode, limit
        self.calls: list[dict] = []

    def answer(self, text: str) -> str:
        m = NEEDLE.search(text)
        key = m.group(1)
        wrong = "".join(str((int(c) + 1) % 10) for c in key)
        if self.mode == "right":
            return key
        if self.mode == "wrong":
            return wrong
        if self.mode == "half":
            h = len(key) // 2
            return key[:h] + wrong[h:]
        if self.mode == "shallow":  # needle in the first 40% of the filler (the toy layout's depth)
            start, needle = m.start() - len(" The "), f" The passkey is {key}. Remember it. "
            n_fill = len(text) - len(INSTRUCTION) - len(needle) - len(QUESTION)
            return key if (start - len(INSTRUCTION)) / n_fill < 0.4 else wrong
        if self.mode == "short":
            return key if len(text) < self.limit else wrong
        raise ValueError(self.mode)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        self.calls.append({"shape": tuple(input_ids.shape), "max_new_tokens": max_new_tokens, "training": self.training,
                           **kwargs})
        rows = []
        for row in input_ids.tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            try:
                new = self.tokenizer.encode(" " + self.answer(text) + ".", add_special_tokens=False)
            except TypeError:
                new = self.tokenizer.encode(" " + self.answer(text) + ".")
            new = (new + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(row + new)
        return torch.tensor(rows, dtype=torch.long)
