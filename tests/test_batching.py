"""Requests are independent (ARCHITECTURE.md, contract 5): a request that joins a running batch at decode
step k gets the tokens it gets alone, and its neighbours' tokens do not change."""

from __future__ import annotations

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.inference import DecodeBatch, SamplingConfig, generate

N = 12


def _requests(model):
    """(prompt ids, images): two with images of different sizes, one text-only, of different lengths."""
    g = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    out = []
    for n, sizes in ((5, [(40, 56)]), (9, []), (3, [(70, 30), (32, 32)])):
        images = [model.image_processor(scene(w, h, i + 1)) for i, (w, h) in enumerate(sizes)]
        ids = text(n)
        for img in images:
            ids += [PLACEHOLDER] * model.fusion.placeholder_tokens(img.num_tokens) + text(2)
        out.append((ids, images))
    return out


def _alone(model, ids, images):
    return generate(model, [ids], [images] if images else None, SamplingConfig(max_new_tokens=N), include_stop=True)[0]


@pytest.mark.parametrize("fusion,mode", [("early", "fixed"), ("cross", "fixed"), ("cross", "tiles")])
@pytest.mark.parametrize("join_at", [0, 1, 5])
def test_a_request_joining_at_step_k_gets_its_tokens_alone(fusion, mode, join_at):
    kwargs = {"pad_tiles": True, "overview": False, "max_tiles": 2} if mode == "tiles" else {}
    model = make_model(tiny_config(fusion, mode=mode, **kwargs), gates=0.5)
    requests = _requests(model)
    expected = [_alone(model, ids, imgs) for ids, imgs in requests]
    assert len({tuple(e) for e in expected}) == 3  # three different answers, so a mix-up would show
    batch = DecodeBatch(model, max_rows=3, max_len=max(len(ids) for ids, _ in requests) + N + 1,
                        sampling=SamplingConfig(max_new_tokens=N))
    first = batch.add(*requests[0])
    second = batch.add(*requests[1])
    for _ in range(join_at):
        batch.step()
    late = batch.add(*requests[2])  # joins while the others are mid-decode, at other lengths
    while batch.step():
        pass
    assert [first.tokens, second.tokens, late.tokens] == expected


def test_a_freed_row_takes_a_new_request_and_stays_independent():
    model = make_model(tiny_config("cross"), gates=0.5)
    (a_ids, a_imgs), (b_ids, _), (c_ids, c_imgs) = _requests(model)
    batch = DecodeBatch(model, max_rows=2, max_len=64, sampling=SamplingConfig(max_new_tokens=N))
    a = batch.add(a_ids, a_imgs)
    b = batch.add(b_ids)
    for _ in range(3):
        batch.step()
    batch.remove(a)  # a leaves early; its row (and its cross-attention states) go to c
    c = batch.add(c_ids, c_imgs)
    assert c.row == a.row
    while batch.step():
        pass
    assert b.tokens == _alone(model, b_ids, [])
    assert c.tokens == _alone(model, c_ids, c_imgs)
    with pytest.raises(RuntimeError, match="the batch is full"):
        batch.add(b_ids)
