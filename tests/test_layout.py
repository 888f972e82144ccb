"""``build_layout``: the ragged batch a step hands its attention backend, against its definition
(``attention/base.py``): per branch, its query rows, its pages, its last page's fill, each new
token's absolute position and the (page, slot) its K/V go to."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.attention.base import build_layout

CPU = torch.device("cpu")


def test_docstring_example() -> None:
    # branch 0: 5 prompt tokens, KV 5; branch 1: 1 decode token, KV 20 (page size 16)
    slots = [[3 * 16 + i for i in range(5)], [7 * 16 + 3]]
    lay = build_layout([5, 1], [5, 20], [[3], [0, 7]], slots, 16, CPU)
    assert lay.qo_indptr.tolist() == [0, 5, 6]
    assert lay.kv_indptr.tolist() == [0, 1, 3]
    assert lay.kv_indices.tolist() == [3, 0, 7]
    assert lay.kv_last_page_len.tolist() == [5, 4]
    assert lay.positions.tolist() == [0, 1, 2, 3, 4, 19]
    assert lay.write_pages.tolist() == [3] * 5 + [7]
    assert lay.write_offsets.tolist() == [0, 1, 2, 3, 4, 3]
    assert lay.qo_indptr.dtype == torch.int32 and lay.positions.dtype == torch.int64
    assert not lay.is_decode and lay.num_tokens == 6
    assert lay.last_rows is not None and lay.last_rows.tolist() == [4, 5]
    assert lay.token_ids is None
    ids = [11, 12, 13, 14, 15, 99]
    with_ids = build_layout([5, 1], [5, 20], [[3], [0, 7]], slots, 16, CPU, iter(ids))
    assert with_ids.token_ids is not None and with_ids.token_ids.tolist() == ids
    assert with_ids.token_ids.dtype == torch.int64
    assert with_ids.positions.tolist() == lay.positions.tolist()


@st.composite
def steps(draw: st.DrawFn) -> tuple[list[int], list[int], list[list[int]], list[list[int]], int]:
    page_size = draw(st.sampled_from([1, 4, 16]))
    n = draw(st.integers(1, 6))
    q_lens = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n).filter(any))
    kv_lens = [q + draw(st.integers(0 if q else 1, 70)) for q in q_lens]
    page_lists = [
        draw(
            st.lists(st.integers(0, 500), min_size=-(-k // page_size), max_size=-(-k // page_size))
        )
        for k in kv_lens
    ]
    slots = [
        draw(st.lists(st.integers(0, 500 * page_size), min_size=q, max_size=q)) for q in q_lens
    ]
    return q_lens, kv_lens, page_lists, slots, page_size


@settings(max_examples=150, deadline=None)
@given(steps())
def test_layout_matches_its_definition(
    step: tuple[list[int], list[int], list[list[int]], list[list[int]], int],
) -> None:
    q_lens, kv_lens, page_lists, slots, P = step
    lay = build_layout(q_lens, kv_lens, page_lists, slots, P, CPU)
    qo, kvp, indices, positions = [0], [0], [], []
    for q, k, pages in zip(q_lens, kv_lens, page_lists, strict=True):
        qo.append(qo[-1] + q)
        indices += pages
        kvp.append(len(indices))
        positions += range(k - q, k)
    flat = [s for row in slots for s in row]
    assert lay.qo_indptr.tolist() == qo
    assert lay.kv_indptr.tolist() == kvp
    assert lay.kv_indices.tolist() == indices
    assert lay.kv_last_page_len.tolist() == [(k - 1) % P + 1 for k in kv_lens]
    assert lay.positions.tolist() == positions
    assert lay.write_pages.tolist() == [s // P for s in flat]
    assert lay.write_offsets.tolist() == [s % P for s in flat]
    assert lay.is_decode == all(q == 1 for q in q_lens)


def test_mismatched_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="2 q_lens, 2 kv_lens, 1 page lists"):
        build_layout([1, 1], [3, 4], [[0]], [[2], [3]], 4, CPU)
    for bad in ([[2]], [[2, 3, 1]]):  # slot lists shorter, longer than the new tokens
        with pytest.raises(ValueError, match="slots per branch"):
            build_layout([2], [3], [[0]], bad, 4, CPU)
    with pytest.raises(ValueError, match=r"slots per branch \[1, 2\] for \[2, 1\]"):
        build_layout([2, 1], [3, 2], [[0], [1]], [[17], [34, 35]], 4, CPU)  # right total
