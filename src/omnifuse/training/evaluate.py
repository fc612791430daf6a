"""Evaluation of a model on held-out records: validation loss and exact-match accuracy of
greedy answers, overall and per skill."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from omnifuse.inference import SamplingConfig, generate
from omnifuse.training.collate import collate
from omnifuse.training.examples import ExampleReader
from omnifuse.training.losses import IGNORE, next_token_loss
from omnifuse.training.precision import Precision

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, tokenizer, reader: ExampleReader, source, max_new_tokens: int, size: int | None = None,
             batch_size: int = 32, precision: Precision | None = None) -> dict:
    """``val_loss``: next-token loss per answer token over the records (None when no row fit
    ``max_length``); ``accuracy`` and ``accuracy/<skill>`` (over ``count`` and ``count/<skill>`` records): the share of records whose greedy
    answer (at most ``max_new_tokens``, lower-cased, stripped) equals ``meta["answer"]``. The
    first ``size`` records (all by default), ``batch_size`` at a time, each forward pass in
    ``precision`` (the run's; default plain float32)."""
    model.eval()
    device = model.device
    n = len(source) if size is None else min(size, len(source))
    correct: dict[str, list[int]] = {}
    loss_sum, loss_tokens = 0.0, 0
    eos = tuple(tokenizer.eos_token_ids)
    for start in range(0, n, batch_size):
        records, images = [], []
        for i in range(start, min(n, start + batch_size)):
            record = source[i]
            imgs = reader.media(record, i)
            if imgs is not None:
                records.append(record)
                images.append(imgs)
        if not records:
            continue
        examples = [reader.builder.build(r[0], imgs, r[2]) for r, imgs in zip(records, images)]
        kept = [e for e in examples if e is not None]
        with precision.autocast() if precision is not None else nullcontext():
            if kept:
                batch = collate(kept, tokenizer.pad_token_id)
                labels = batch["labels"].to(device)
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               images=batch["images"])
                loss_sum += float(next_token_loss(logits, labels, reduction="sum"))
                loss_tokens += int((labels[:, 1:] != IGNORE).sum())
            laid_out = [reader.builder.prompt_and_media(r[0][:-1], media) for r, media in zip(records, images)]
            prompts, items = [ids for ids, _ in laid_out], [row for _, row in laid_out]
            outs = generate(model, prompts, items if any(items) else None,
                            SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=eos),
                            pad_id=tokenizer.pad_token_id)
        for r, out in zip(records, outs):
            answer = tokenizer.decode(out).strip().lower()
            correct.setdefault(r[2].get("skill", "all"), []).append(int(answer == str(r[2]["answer"]).strip().lower()))
    result = {f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(correct.items())}
    result.update({f"count/{k}": len(v) for k, v in sorted(correct.items())})  # the samples behind each
    result["accuracy"] = sum(sum(v) for v in correct.values()) / max(1, sum(len(v) for v in correct.values()))
    result["count"] = sum(len(v) for v in correct.values())
    result["val_loss"] = loss_sum / loss_tokens if loss_tokens else None  # None: no row fit max_length
    return result
