"""The shipped offline tokenizer: small, single-digit numbers, special tokens, lossless round trip."""

from __future__ import annotations

import pytest

from condensation.tokenizer import BUILTIN_DIR, BUILTIN_VOCAB_SIZE, build_builtin_tokenizer, load_tokenizer


def test_fits_tiny_cpu_vocab_and_has_specials(tokenizer):
    assert len(tokenizer) <= BUILTIN_VOCAB_SIZE == 2048
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert max(tokenizer.get_vocab().values()) < 2048


def test_digits_are_single_tokens(tokenizer):
    for d in "0123456789":
        assert len(tokenizer.encode(d, add_special_tokens=False)) == 1
    ids = tokenizer.encode("The passkey is 9054", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["9", "0", "5", "4"]
    assert len(tokenizer.encode("31415926", add_special_tokens=False)) == 8


def test_round_trip_and_bos(tokenizer, documents):
    text = documents[3][:3000] + "\n\nünïcödé 😀 tabs\tand  spaces"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id  # like Llama: encode() prepends bos


def test_shipped_files_small():
    assert sum(p.stat().st_size for p in BUILTIN_DIR.iterdir()) < 1_000_000


def test_build_is_reproducible(tmp_path, tokenizer):
    rebuilt = build_builtin_tokenizer(tmp_path / "tok")
    assert rebuilt.get_vocab() == tokenizer.get_vocab()


def test_folder_and_errors(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "copy"))
    assert load_tokenizer(str(tmp_path / "copy")).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(OSError, match="no-such-tokenizer-dir"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer-dir"))
