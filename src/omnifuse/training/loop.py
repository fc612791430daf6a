"""The training loop: one process or many under torchrun (DDP, or FSDP as an option).

Every optimizer step consumes a fixed global batch of ``batch_size x world_size x grad_accum``
rows, drawn from a per-epoch permutation seeded by ``seed``: the data position is a pure function
of the step, so resuming at step s reads exactly what an uninterrupted run would. The loss is summed
over answer tokens and divided by the global batch's token count, so any split of that batch over
processes and micro-batches gives the same gradient (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist

from omnifuse.config import ConfigError
from omnifuse.inference import SamplingConfig, generate
from omnifuse.processing.image import ImageError
from omnifuse.processing.prompt import PromptLayout
from omnifuse.training.collate import ExampleBuilder, collate, length_groups
from omnifuse.training.config import TrainConfig, config_dict
from omnifuse.training.llava_data import DataFormatError
from omnifuse.training.losses import IGNORE, answer_positions, next_token_loss, selected_token_loss
from omnifuse.training.progress import StepProgress
from omnifuse.training.sources import build_sources
from omnifuse.training.stages import STAGES, set_trainable
from omnifuse.training.state import latest_checkpoint, load_training_state, save_training_state

__all__ = ["Trainer", "train"]


def _resolve_model_config(name: str):
    from omnifuse.config import load_config
    from omnifuse.presets import PRESETS, get_preset

    return get_preset(name) if name in PRESETS or not Path(name).suffix else load_config(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, model_config=None, quiet: bool = False,
                 shared_features: dict | None = None) -> None:
        """``shared_features``: a dict in which a frozen vision encoder's output is kept per
        training image, so each image is encoded once per run, and once for all the trainers
        given the same dict (the arena's strategies, which share one frozen encoder). Only used
        while the encoder does not learn; the caller guarantees the encoder weights are equal."""
        from omnifuse.model import build_model, ensure_model_fits
        from omnifuse.processing.text import load_tokenizer

        self.cfg, self.quiet = cfg, quiet
        if cfg.distributed == "fsdp":
            # Not yet: evaluation and checkpoints run on rank 0 alone, which a sharded model cannot
            # do without gathering its parameters first. Refused with or without torchrun, so the
            # setting is never silently ignored.
            raise ConfigError("distributed: fsdp is not supported yet (evaluation and checkpoints need gathered "
                              "parameters); use distributed: ddp (under torchrun) or leave it out")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if cfg.init_checkpoint:  # the checkpoint's own architecture (omnifuse or Hugging Face folder)
            from omnifuse.interop import load_any_model

            self.model = load_any_model(cfg.init_checkpoint)
            self.model_config = self.model.config
        else:
            self.model_config = model_config or _resolve_model_config(cfg.model)
            ensure_model_fits(self.model_config, f"training {cfg.model}", copies=4)
            self.model = build_model(self.model_config)
        self.tokenizer = load_tokenizer(self.model_config.text, cfg.init_checkpoint or None)
        self.model.placeholder_id = self.tokenizer.image_token_id
        stage = STAGES[cfg.stage]
        groups = stage.groups + (("encoder",) if cfg.train_encoder and "encoder" not in stage.groups else ())
        self.trainable = set_trainable(self.model, groups)
        self.head = None
        if stage.loss == "contrastive":
            from omnifuse.training.contrastive import ContrastiveHead

            self.head = ContrastiveHead(self.model_config.vision.feature_dim, self.model_config.decoder.hidden_size,
                                        loss=cfg.contrastive_loss)
        self.train_source, self.val_source = build_sources(cfg)
        encoder_learns = any(p.requires_grad for p in self.model.vision_encoder.parameters())
        per_crop = self.model_config.vision.type == "vit"  # the tiled Mllama encoder sees whole images
        self.shared_features = shared_features if per_crop and not encoder_learns else None
        self.builder = ExampleBuilder(PromptLayout.for_model(self.model_config, self.tokenizer), cfg.max_length,
                                      cfg.truncation)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        named += [(f"head.{n}", p) for n, p in self.head.named_parameters()] if self.head is not None else []
        groups = []
        for is_encoder in (False, True):  # a fine-tuned pre-trained encoder usually wants a smaller step
            lr = cfg.lr * (cfg.encoder_lr_scale if is_encoder and cfg.stage != "contrastive" else 1.0)
            part = [p for n, p in named if n.startswith("encoders.") == is_encoder]
            groups += [{"params": [p for p in part if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                       {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]  # norms, biases, gates
        # fused: one kernel for every parameter (about 4x faster than the per-tensor loop on a CPU)
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.wrapped = self.model
        if self.world > 1:
            self.wrapped = self._distribute()
        self.out_dir = Path(cfg.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.skipped_media: dict[str, str] = {}  # "record N" -> why its media could not be used
        self.rows_trained = 0  # usable rows over all processes, this run
        self._unusable = 0  # records drawn since the last usable row

    # ------------------------------------------------------------------ setup helpers
    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio`` (both as fractions of ``lr``)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _distribute(self):
        from torch.nn.parallel import DistributedDataParallel

        # Rows without images leave the encoder unused in some steps.
        return DistributedDataParallel(self.model, find_unused_parameters=True)

    # ------------------------------------------------------------------ data
    def _indices(self, step: int) -> list[list[int]]:
        """This process's micro-batches (source indices) of optimizer step ``step``."""
        cfg, n = self.cfg, len(self.train_source)
        per_process = cfg.batch_size * cfg.grad_accum
        global_batch = per_process * self.world
        rows = []
        for j in range(global_batch):
            g = step * global_batch + j
            epoch, pos = divmod(g, n)
            perm = self._permutation(epoch)
            rows.append(int(perm[pos]))
        # Row j of the global batch goes to process (j // batch_size) % world, in micro-batch order.
        mine = [r for j, r in enumerate(rows) if (j // cfg.batch_size) % self.world == self.rank]
        return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]

    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.train_source), generator=g))
        return self._perm_cache[1]

    def _images(self, record, i: int):
        """The record's processed images, or None when one cannot be used: skipped and counted by
        record index (``on_error: skip``) or a DataFormatError naming the record (``raise``)."""
        _turns, image_sources, meta = record
        try:
            return [self.model.image_processor(s) for s in image_sources]
        except ImageError as e:
            where = f"record {meta.get('index', i)}"
            if self.cfg.on_error == "raise":
                raise DataFormatError(f"{self.cfg.data_path or self.cfg.data}: {where}: {e}") from None
            if where not in self.skipped_media:
                self.skipped_media[where] = str(e)
                print(f"omnifuse: warning: skipped {where}: {e}", file=sys.stderr, flush=True)
            return None

    def _examples(self, source, indices: list[int]):
        out, rows = [], []
        for i in indices:
            record = source[i]
            images = self._images(record, i)
            ex = self.builder.build(record[0], images, record[2]) if images is not None else None
            if ex is not None:
                out.append(ex)
                rows.append(i)
        fingerprint = getattr(source, "fingerprint", None)
        if self.shared_features is not None and fingerprint is not None:
            self._reuse_features(fingerprint, rows, out)
        return out

    @torch.no_grad()
    def _reuse_features(self, fingerprint: tuple, rows: list[int], examples) -> None:
        """Give every image of ``examples`` its frozen encoder output from ``shared_features``,
        encoding (in one batch) the images seen for the first time."""
        cache = self.shared_features
        new = [((fingerprint, i, j), img) for i, ex in zip(rows, examples) for j, img in enumerate(ex.images)
               if (fingerprint, i, j) not in cache]
        if new:
            for (key, _), feats in zip(new, self.model.media_features([img for _, img in new])):
                cache[key] = feats
        for i, ex in zip(rows, examples):
            ex.images = [dataclasses.replace(img, features=cache[(fingerprint, i, j)])
                         for j, img in enumerate(ex.images)]

    # ------------------------------------------------------------------ steps
    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(value)
        return value

    def train_step(self, step: int) -> float:
        """One optimizer step; its loss, or NaN when no row of the global batch was usable (the
        weights are then untouched: no gradient, so AdamW skips every parameter)."""
        self.wrapped.train()
        micro = [self._examples(self.train_source, idx) for idx in self._indices(step)]
        if self.head is None:  # rows of similar length share a forward pass (same gradient)
            micro = [group for mb in micro for group in length_groups(mb)]
        rows = int(self._all_reduce(torch.tensor(sum(len(mb) for mb in micro))))
        self.rows_trained += rows
        if rows == 0:
            self._optimizer_step()  # no gradients: AdamW leaves every parameter; the schedule moves on
            self._unusable += self.cfg.batch_size * self.cfg.grad_accum * self.world
            if self._unusable >= len(self.train_source):
                raise DataFormatError(f"a whole epoch ({len(self.train_source)} records) gave no usable "
                                      f"training row: {self._unusable_reasons()}")
            return float("nan")
        self._unusable = 0
        if self.head is not None:
            return self._contrastive_step(micro)
        tokens = sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for mb in micro for e in mb)
        global_tokens = self._all_reduce(torch.tensor(float(tokens))).clamp(min=1.0)
        total = torch.zeros(())
        for k, examples in enumerate(micro):
            if not examples:
                continue
            batch = collate(examples, self.tokenizer.pad_token_id)
            sync = k == len(micro) - 1 or self.world == 1
            ctx = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else nullcontext()
            with ctx:
                # Only the answer positions' logits are computed (their share of the last layer too).
                positions, targets = answer_positions(batch["labels"])
                logits = self.wrapped(batch["input_ids"], batch["attention_mask"], images=batch["images"],
                                      outputs=positions)
                loss_sum = selected_token_loss(logits, targets)
                # DDP averages gradients over processes; scale so the result is the global token mean.
                (loss_sum / global_tokens * self.world).backward()
            total += loss_sum.detach()
        self._optimizer_step()
        return float(self._all_reduce(total) / global_tokens)

    def _contrastive_step(self, micro) -> float:
        examples = [e for mb in micro for e in mb]
        pixels = [e.images[0].pixel_values for e in examples]
        captions = [[t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE] for e in examples]
        loss = self.head(self.model, pixels, captions)
        loss.backward()
        self._optimizer_step()
        return float(loss.detach())

    def _unusable_reasons(self) -> str:
        reasons = []
        if self.builder.dropped:
            reasons.append(f"{self.builder.dropped} rows dropped by truncation ({self.builder.last_drop})")
        if self.skipped_media:
            reasons.append(f"{len(self.skipped_media)} records skipped for their media "
                           f"(first: {next(iter(self.skipped_media.items()))})")
        return "; ".join(reasons) or "every row was empty"

    def _optimizer_step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, source=None, size: int | None = None, batch_size: int = 32) -> dict:
        """Validation loss and exact-match accuracy of greedy answers, overall and per skill."""
        source = source if source is not None else self.val_source
        if source is None or self.head is not None:
            return {}
        self.model.eval()
        n = len(source) if size is None else min(size, len(source))
        correct: dict[str, list[int]] = {}
        loss_sum, loss_tokens = 0.0, 0
        eos = tuple(self.tokenizer.eos_token_ids)
        for start in range(0, n, batch_size):
            records, images = [], []
            for i in range(start, min(n, start + batch_size)):
                record = source[i]
                imgs = self._images(record, i)
                if imgs is not None:
                    records.append(record)
                    images.append(imgs)
            if not records:
                continue
            examples = [self.builder.build(r[0], imgs, r[2]) for r, imgs in zip(records, images)]
            kept = [e for e in examples if e is not None]
            if kept:
                batch = collate(kept, self.tokenizer.pad_token_id)
                logits = self.model(batch["input_ids"], batch["attention_mask"], images=batch["images"])
                loss_sum += float(next_token_loss(logits, batch["labels"], reduction="sum"))
                loss_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
            prompts = [self.builder.prompt(r[0][:-1], imgs) for r, imgs in zip(records, images)]
            outs = generate(self.model, prompts, images if any(images) else None,
                            SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, stop_token_ids=eos),
                            pad_id=self.tokenizer.pad_token_id)
            for r, out in zip(records, outs):
                answer = self.tokenizer.decode(out).strip().lower()
                correct.setdefault(r[2].get("skill", "all"), []).append(int(answer == str(r[2]["answer"]).strip().lower()))
        result = {f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(correct.items())}
        result["accuracy"] = sum(sum(v) for v in correct.values()) / max(1, sum(len(v) for v in correct.values()))
        result["val_loss"] = loss_sum / loss_tokens if loss_tokens else None  # None: no row fit max_length
        return result

    # ------------------------------------------------------------------ the run
    def _log(self, record: dict) -> None:
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _resume(self) -> int:
        path = latest_checkpoint(self.out_dir) if self.cfg.resume else None
        if path is None:
            if self.main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run starts a fresh log
            return 0
        state = load_training_state(path, self.model, self.optimizer, self.scheduler)
        step = int(state["step"])
        if self.main and self.metrics_path.exists():  # forget what was logged after that checkpoint
            kept = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
        return step

    def _checkpoint(self, step: int) -> None:
        if self.world > 1:
            torch_dist.barrier()
        if self.main:
            save_training_state(self.out_dir, step, self.model, self.optimizer, self.scheduler,
                                {"config": config_dict(self.cfg)}, keep=self.cfg.keep_checkpoints)

    def run(self) -> dict:
        cfg = self.cfg
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume()
        if start and self.main:
            print(f"resuming {self.out_dir} from step {start} of {cfg.steps} (its latest checkpoint)", flush=True)
        last_eval: dict = {}
        t0, loss = time.perf_counter(), float("nan")
        with StepProgress(f"train {cfg.stage}", cfg.steps, start, enabled=not self.quiet and self.main,
                          every=cfg.log_seconds) as progress:
            # (Preparing the next step's rows in a thread during this step was tried: on 2 cores it
            # competes with torch's own threads and made the arena's steps 40% slower.)
            for step in range(start, cfg.steps):
                loss = self.train_step(step)
                done = step + 1
                progress.update(done, loss)
                record = {"step": done, "loss": None if math.isnan(loss) else loss, "lr": self.scheduler.get_last_lr()[0]}
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    last_eval = self._eval_main()
                    record.update(last_eval)
                self._log(record)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self._checkpoint(done)
                if cfg.stop_after and done >= cfg.stop_after:
                    sys.stdout.flush()
                    os._exit(17)  # as if killed: nothing after this step is written
        if start < cfg.steps and self.rows_trained == 0:
            # Nothing was learned: a checkpoint and a loss would only pretend otherwise.
            raise DataFormatError(f"no training step had a usable row: {self._unusable_reasons()}")
        last_eval = self._eval_main()
        self._log({"step": cfg.steps, "final": True, **last_eval})
        self._checkpoint(cfg.steps)
        if self.world > 1:
            torch_dist.barrier()
        return {"steps": cfg.steps, "loss": None if math.isnan(loss) else loss, "dropped": self.builder.dropped,
                "skipped_media": len(self.skipped_media), **last_eval, "seconds": time.perf_counter() - t0,
                "trainable": self.trainable}

    def _eval_main(self) -> dict:
        result = self.evaluate() if self.main else {}
        if self.world > 1:
            torch_dist.barrier()
        return result


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    return Trainer(cfg, quiet=quiet).run()
