"""Tokenizers for the project: any Hugging Face tokenizer, or a small one shipped with the package.

Why ship one: the CPU machines and CI cannot reach the Hugging Face hub, yet the data layer, the "tiny-cpu"
model (vocab 2048) and the passkey task still need a real tokenizer. The shipped one is byte-level BPE
(every byte is representable, so no text is ever unknown), trained on text every CPython carries
(`pydoc_data.topics`) plus the paper's prompt words, and splits numbers into single digits so that a
4-digit passkey is exactly 4 tokens (Llama-3 groups up to three digits; the tiny model should not have to
learn 1000 digit-group tokens to do the passkey task).

Rebuild it (deterministic; the files are committed under `condensation/assets/tokenizer/`):

    .venv/bin/python -m condensation.tokenizer --build
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
BUILTIN_VOCAB_SIZE = 2048  # the "tiny-cpu" model size's vocab; len(tokenizer) must not exceed it

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerFast:
    """Load the shipped offline tokenizer (None or "builtin"), a `condensation.pretrained` name (its converted
    folder's tokenizer, e.g. "smollm2-135m-instruct"), or any HF tokenizer id / local folder.

    A tokenizer without a pad token gets its eos as pad, because the data layer pads summarization
    examples and needs some id there (padded positions always carry label -100, so the choice is inert).
    """
    if name_or_path is None or name_or_path == BUILTIN_NAME:
        if not (BUILTIN_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"the builtin tokenizer is missing from {BUILTIN_DIR}; "
                "rebuild it with `python -m condensation.tokenizer --build`"
            )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(BUILTIN_DIR))
    else:
        from .pretrained import resolve_pretrained

        name_or_path = resolve_pretrained(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise OSError(f"cannot load tokenizer {name_or_path!r}: {error}") from error
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_texts() -> Iterator[str]:
    """Text the builtin tokenizer is trained on: CPython's language reference plus the paper's prompts.

    The prompts are repeated so that their words become whole tokens (the passkey filler is most of
    every passkey example; short token counts there keep the tiny model's sequences cheap).
    """
    from pydoc_data.topics import topics  # real English text that ships with every CPython

    for name in sorted(topics):
        yield topics[name]
    # imported lazily: condensation.data imports this module
    from condensation.data.passkey import PASSKEY_FILLER, PASSKEY_INSTRUCTION, PASSKEY_QUESTION
    from condensation.data.summarization import SUMMARY_PROMPT

    prompt_words = "\n\n".join([PASSKEY_INSTRUCTION, PASSKEY_FILLER, PASSKEY_QUESTION,
                                SUMMARY_PROMPT.format(article="article")])
    for _ in range(50):
        yield prompt_words


def build_builtin_tokenizer(out_dir: Path = BUILTIN_DIR,
                            vocab_size: int = BUILTIN_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train and save the shipped byte-level BPE tokenizer; returns it loaded from `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Digits first: BPE merges never cross pre-token boundaries, so numbers stay single digits.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    # Like Llama, encode() prepends bos; the data layer encodes with add_special_tokens=False and places
    # bos itself, so both paths give the same ids.
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=1 << 30,  # a long-context project: no warning at 4K+ tokens
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(str(out_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="train and save the builtin tokenizer")
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return
    tok = build_builtin_tokenizer(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"saved {len(tok)} tokens to {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
