"""Tokenizer: HF tokenizers through transformers' ``AutoTokenizer``.

A thin layer so the engine speaks ids and the rest of the package speaks text: BOS is added
the way the checkpoint's tokenizer config says, a chat template is applied when asked and
present, and the stop/eos ids come from the tokenizer and the model config together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dendrite.errors import CheckpointError, ConfigError


class Tokenizer:
    """Wraps a ``PreTrainedTokenizerBase``."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    @property
    def bos_token_id(self) -> int | None:
        bos = self.hf.bos_token_id
        return None if bos is None else int(bos)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.hf.eos_token_id
        return None if eos is None else int(eos)

    def encode(
        self, text: str, *, add_special_tokens: bool = True, chat: bool = False
    ) -> list[int]:
        """Token ids of ``text``; ``chat=True`` wraps it as one user turn of the chat template."""
        if chat:
            if not getattr(self.hf, "chat_template", None):
                raise ConfigError("chat=True but this tokenizer has no chat template")
            ids = self.hf.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def __len__(self) -> int:
        return len(self.hf)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when the directory has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return Tokenizer(AutoTokenizer.from_pretrained(str(path)))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
