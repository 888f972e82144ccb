"""What every notebook starts with: the repository's paths and the default engine.

Notebooks run from ``notebooks/`` (nbmake, JupyterLab) or anywhere else; paths are found from
the installed package, never from the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import dendrite
from dendrite.engine import Engine
from dendrite.errors import GrammarError

if TYPE_CHECKING:
    from dendrite.grammar import Grammar


def repo_root() -> Path:
    """The checkout holding ``dendrite/`` (and ``data/``, ``notebooks/``)."""
    return Path(dendrite.__file__).resolve().parents[1]


def data_path(*parts: str) -> Path:
    """A path under the repository's ``data/``, e.g. ``data_path("schemas", "x.json")``."""
    return repo_root().joinpath("data", *parts)


def load_default_engine(threads: int | None = 1, num_pages: int | None = None) -> Engine:
    """The shipped default model (``data/models/dendrite-24``) on CPU.

    ``threads=1`` by default: a 4-million-parameter model gains nothing from more CPU threads
    and the notebooks stay polite on a shared machine; ``None`` leaves torch's setting alone.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    return Engine.from_pretrained(data_path("models", "dendrite-24"), num_pages=num_pages)


def stories_path() -> Path:
    """llama2.c's stories260K reference checkpoint beside the checkout (may be absent)."""
    return repo_root().parent / "shared" / "reference" / "stories260k"


def load_grammar_engine(schema: dict[str, Any], threads: int | None = 1) -> tuple[Engine, Grammar]:
    """An engine whose tokenizer llguidance can read, and ``schema`` compiled for it.

    Tries stories260K first (a SentencePiece tokenizer; it writes English words into the
    strings), then the default model. Raises :class:`GrammarError` naming why each failed.
    """
    from dendrite.grammar import Grammar

    if threads is not None:
        torch.set_num_threads(threads)
    reasons = []
    for path in (stories_path(), data_path("models", "dendrite-24")):
        if not (path / "tokenizer.json").is_file():
            reasons.append(f"{path}: no tokenizer.json")
            continue
        engine = Engine.from_pretrained(path)
        if engine.tokenizer is None:
            continue
        try:
            return engine, Grammar.json_schema(schema, engine.tokenizer)
        except GrammarError as e:
            reasons.append(f"{path.name}: {e}")
    raise GrammarError("no model with a tokenizer llguidance can read: " + "; ".join(reasons))
