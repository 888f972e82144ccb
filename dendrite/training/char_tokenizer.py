"""The character-level tokenizer of the small models Dendrite trains itself.

One token per character: the four specials, newline, and the 95 printable ASCII characters,
100 ids in all (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3). Built with the ``tokenizers``
library and saved as ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``, so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it and,
as for LLaMA, ``tok("24").input_ids`` is ``[1, <2>, <4>]``: BOS prepended, no EOS.

Training encodes with :func:`encode` (a dict lookup, no BOS) instead of the HF object: the same
ids, checked by the tests, without the per-call overhead in the data workers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors

from dendrite.errors import ConfigError

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIALS = (UNK, BOS, EOS, PAD)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII
MODEL_MAX_LENGTH = 512


def vocabulary() -> dict[str, int]:
    """Token -> id: the specials first, then the characters in code-point order."""
    return {tok: i for i, tok in enumerate((*SPECIALS, *CHARACTERS))}


VOCAB_SIZE = len(SPECIALS) + len(CHARACTERS)


def encode(text: str, vocab: dict[str, int] | None = None) -> list[int]:
    """Ids of ``text`` without BOS/EOS; refuses characters outside the vocabulary."""
    vocab = vocab or vocabulary()
    try:
        return [vocab[c] for c in text]
    except KeyError as e:
        raise ConfigError(f"character {e.args[0]!r} is not in the character vocabulary") from None


def build_tokenizer() -> Tokenizer:
    """A ``tokenizers.Tokenizer``: BPE with no merges over single characters (so each character
    is one token and no pre-tokenizer splits on spaces), BOS prepended, characters fused back
    on decode."""
    tok = Tokenizer(models.BPE(vocab=vocabulary(), merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.decoder = decoders.Fuse()
    return tok


def save_tokenizer(directory: str | Path) -> None:
    """Write the three files ``AutoTokenizer`` reads into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


__all__ = [
    "BOS",
    "BOS_ID",
    "CHARACTERS",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIALS",
    "UNK",
    "UNK_ID",
    "VOCAB_SIZE",
    "build_tokenizer",
    "encode",
    "save_tokenizer",
    "vocabulary",
]
