"""Deterministic training batches: batch ``i`` is a pure function of ``(seed, i)``.

Each batch is drawn afresh from the task's document sampler with ``random.Random`` seeded by
the batch index, so the data order does not depend on how many DataLoader workers build it
(CPU runs with none, the GPU run with several) and a run is reproducible from its seed alone.

A batch is one document a row, right-padded::

    input_ids  <s> p r o m p t c o m p l e t i o n </s> <pad> <pad>
    labels     -100 ...  -100  c o m p l e t i o n </s> -100  -100

HF's ``LlamaForCausalLM`` shifts ``labels`` itself, so the loss is on the completion and EOS
only. Right padding needs no attention mask: with causal attention no real token sees a pad.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from dendrite.tasks.game24_traces import Document
from dendrite.training.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, encode, vocabulary

IGNORE_INDEX = -100

Sampler = Callable[[random.Random], Document]


def batch_rng(seed: int, index: int) -> random.Random:
    """An RNG for batch ``index`` of run ``seed``, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def collate(
    docs: Sequence[Document], vocab: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Token ids and labels of ``docs``: ``{"input_ids", "labels"}``, both ``[B, T]`` int64."""
    vocab = vocab or vocabulary()
    rows, labels = [], []
    for doc in docs:
        p, c = encode(doc.prompt, vocab), encode(doc.completion, vocab)
        rows.append([BOS_ID, *p, *c, EOS_ID])
        labels.append([IGNORE_INDEX] * (1 + len(p)) + [*c, EOS_ID])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # [B, T]
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "labels": lab}


class SampledBatches(Dataset[dict[str, torch.Tensor]]):
    """``dataset[i]`` is training batch ``i``: ``batch_size`` documents from ``sample``."""

    def __init__(self, sample: Sampler, batch_size: int, seed: int, length: int) -> None:
        self.sample, self.batch_size, self.seed, self.length = sample, batch_size, seed, length
        self.vocab = vocabulary()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = batch_rng(self.seed, index)
        return collate([self.sample(rng) for _ in range(self.batch_size)], self.vocab)


__all__ = ["IGNORE_INDEX", "SampledBatches", "Sampler", "batch_rng", "collate"]
