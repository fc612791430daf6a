"""The training loop: one process or many under torchrun (DDP), on a CPU or a GPU.

The Trainer wires the parts: the processes (``distributed.py``), the float type
(``precision.py``), the records each step reads (``sampler.py``), records as examples
(``examples.py``), the optimizer and schedule (``optim.py``), evaluation (``evaluate.py``),
checkpoints (``state.py``) and the metrics log (``metrics.py``). The loss is summed over answer
tokens and divided by the global batch's token count, so any split of that batch over processes
and micro-batches gives the same gradient (up to float summation order).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from omnifuse.errors import ConfigError, DataFormatError
from omnifuse.processing.prompt import PromptLayout
from omnifuse.training.collate import ExampleBuilder, collate, length_groups
from omnifuse.training.config import TrainConfig, config_dict
from omnifuse.training.diagnostic import skill_media
from omnifuse.training.distributed import gradient_sync, setup_world
from omnifuse.training.evaluate import evaluate
from omnifuse.training.examples import ExampleReader
from omnifuse.training.losses import IGNORE, answer_positions, selected_token_loss
from omnifuse.training.metrics import MetricsLog
from omnifuse.training.optim import build_optimizer, build_scheduler, optimizer_step, parameter_groups
from omnifuse.training.precision import Precision
from omnifuse.training.progress import StepProgress
from omnifuse.training.sampler import StepSampler
from omnifuse.training.sources import build_sources
from omnifuse.training.stages import STAGES, set_trainable
from omnifuse.training.state import (
    latest_checkpoint,
    load_sharded_training_state,
    load_training_state,
    save_sharded_training_state,
    save_training_state,
)

__all__ = ["Trainer"]


def _check_media(cfg: TrainConfig, config) -> None:
    """Refuse diagnostic skills or encoder training for a modality the model does not take."""
    takes = config.modalities
    wanted = [(f"skill {s}", m) for s in (cfg.skills if cfg.data == "diagnostic" else ()) for m in skill_media(s)]
    wanted += [("train_encoder", m) for m in (() if isinstance(cfg.train_encoder, bool) else cfg.train_encoder)]
    for what, m in wanted:
        if m not in takes:
            raise ConfigError(f"{what} needs {m} input, which {config.name} does not take "
                              f"(it takes {', '.join(takes) or 'no media'})")


def _resolve_model_config(name: str):
    from omnifuse.config import load_config
    from omnifuse.presets import PRESETS, get_preset

    return get_preset(name) if name in PRESETS or not Path(name).suffix else load_config(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, quiet: bool = False, shared_features: dict | None = None) -> None:
        """``shared_features``: a dict in which a frozen vision encoder's output is kept per
        training image, so each image is encoded once per run, and once for all the trainers
        given the same dict (the arena's strategies, which share one frozen encoder). Only used
        while the encoder does not learn; the caller guarantees the encoder weights are equal."""
        from omnifuse.model import build_model, ensure_model_fits
        from omnifuse.processing.text import load_tokenizer, with_placeholder_ids

        self.cfg, self.quiet = cfg, quiet
        self.world = setup_world(cfg.device)
        self.main = self.world.main
        # Sharded across processes: evaluation and checkpoints gather the model (a world of one
        # has nothing to shard; it trains exactly as unsharded).
        self.sharded = cfg.distributed == "fsdp" and self.world.size > 1
        if self.sharded and shared_features is not None:
            raise ConfigError("distributed: fsdp cannot share frozen encoder features between trainers")
        self.precision = Precision.for_run(self.world.device, cfg.dtype)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # Built (or loaded) on the CPU, so the initial weights do not depend on the device.
        if cfg.init_checkpoint:  # the checkpoint's own architecture (omnifuse or Hugging Face folder)
            from omnifuse.interop import load_any_model

            model = load_any_model(cfg.init_checkpoint)
            self.tokenizer = load_tokenizer(model.config.text, cfg.init_checkpoint)
            with_placeholder_ids(model.config, self.tokenizer)  # the checkpoint's ids are its tokenizer's
            self.model_config = model.config
        else:
            config = _resolve_model_config(cfg.model)
            self.tokenizer = load_tokenizer(config.text)
            self.model_config = with_placeholder_ids(config, self.tokenizer)
            ensure_model_fits(self.model_config, f"training {cfg.model}", copies=4, device=self.world.device)
            model = build_model(self.model_config)
        self.model = model.to(self.world.device)  # float32 whatever the dtype (precision.py)
        _check_media(cfg, self.model_config)
        stage = STAGES[cfg.stage]
        groups = stage.groups + tuple(g for g in cfg.encoder_groups() if "encoder" not in stage.groups)
        self.trainable = set_trainable(self.model, groups)
        self.head = None
        if stage.loss == "contrastive":
            from omnifuse.training.contrastive import ContrastiveHead

            self.head = ContrastiveHead(self.model_config.vision.feature_dim, self.model_config.decoder.hidden_size,
                                        loss=cfg.contrastive_loss).to(self.world.device)
        self.train_source, self.val_source = build_sources(cfg, dict(self.model_config.text.placeholder_tokens))
        vision = self.model.vision_encoder
        encoder_learns = vision is not None and any(p.requires_grad for p in vision.parameters())
        # The tiled Mllama encoder sees whole images, not crops: its output is not shared per crop.
        per_crop = self.model_config.vision is not None and self.model_config.vision.type == "vit"
        self.builder = ExampleBuilder(PromptLayout.for_model(self.model_config, self.tokenizer), cfg.max_length,
                                      cfg.truncation)
        self.reader = ExampleReader(self.model, self.builder, cfg.on_error, cfg.data_path or cfg.data,
                                    shared_features if per_crop and not encoder_learns else None)
        self.sampler = StepSampler(len(self.train_source), cfg.seed, cfg.batch_size, cfg.grad_accum,
                                   self.world.size, self.world.rank)
        # FSDP replaces the parameters by their shards: wrap before the optimizer takes them.
        self.wrapped = self.world.wrap(self.model, cfg.distributed)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        named += [(f"head.{n}", p) for n, p in self.head.named_parameters()] if self.head is not None else []
        scale = cfg.encoder_lr_scale if cfg.stage != "contrastive" else 1.0  # contrastive: the encoder is all
        self.optimizer = build_optimizer(parameter_groups(named, cfg.lr, cfg.weight_decay, scale), cfg.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        self.out_dir = Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.main)
        self.rows_trained = 0  # usable rows over all processes, this run
        self._unusable = 0  # records drawn since the last usable row
        from omnifuse.nn.moe import MoE

        self.moe_layers = [m for m in self.model.modules() if isinstance(m, MoE)]
        self.router_losses: dict[str, float] = {}  # the last step's, averaged over its micro-batches

    # ------------------------------------------------------------------ steps
    def train_step(self, step: int) -> float:
        """One optimizer step; its loss, or NaN when no row of the global batch was usable (the
        weights are then untouched: no gradient, so AdamW skips every parameter)."""
        self.wrapped.train()
        micro = [self.reader.examples(self.train_source, idx) for idx in self.sampler.micro_batches(step)]
        if self.head is None:  # rows of similar length share a forward pass (same gradient)
            micro = [group for mb in micro for group in length_groups(mb)]
        device = self.world.device
        rows = int(self.world.sum(torch.tensor(sum(len(mb) for mb in micro), device=device)))
        self.rows_trained += rows
        if rows == 0:
            self._optimizer_step()  # no gradients: AdamW leaves every parameter; the schedule moves on
            self._unusable += self.sampler.global_batch
            if self._unusable >= len(self.train_source):
                raise DataFormatError(f"a whole epoch ({len(self.train_source)} records) gave no usable "
                                      f"training row: {self.reader.unusable_reasons()}")
            return float("nan")
        self._unusable = 0
        if self.head is not None:
            return self._contrastive_step(micro)
        tokens = sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for mb in micro for e in mb)
        global_tokens = self.world.sum(torch.tensor(float(tokens), device=device)).clamp(min=1.0)
        total = torch.zeros((), device=device)
        for k, examples in enumerate(micro):
            if not examples:
                continue
            batch = collate(examples, self.tokenizer.pad_token_id)
            # Only the answer positions' logits are computed (their share of the last layer too).
            positions, targets = (t.to(device) for t in answer_positions(batch["labels"]))
            with gradient_sync(self.wrapped, sync=k == len(micro) - 1):
                with self.precision.autocast():
                    logits = self.wrapped(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          images=batch["images"], outputs=positions)
                loss_sum = selected_token_loss(logits, targets)  # float32
                # DDP averages gradients over processes; scale so the result is the global token mean.
                objective = loss_sum / global_tokens * self.world.size
                if self.moe_layers:  # averaged over processes and micro-batches as they are
                    objective = objective + self._router_loss(len(micro))
                self.precision.backward(objective)
            total += loss_sum.detach()
        self._optimizer_step()
        return float(self.world.sum(total) / global_tokens)

    def _router_loss(self, micro_batches: int) -> torch.Tensor:
        """The MoE layers' load-balancing and z losses of the last forward, weighted, for one of
        ``micro_batches`` micro-batches; their values are kept in ``router_losses``."""
        cfg, n = self.cfg, len(self.moe_layers)
        aux = sum(m.aux_loss for m in self.moe_layers) / n
        z = sum(m.z_loss for m in self.moe_layers) / n
        for name, value in (("router_aux_loss", aux), ("router_z_loss", z)):
            self.router_losses[name] = self.router_losses.get(name, 0.0) + float(value.detach()) / micro_batches
        return (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z) / micro_batches

    def _contrastive_step(self, micro) -> float:
        examples = [e for mb in micro for e in mb]
        pixels = [e.images[0].pixel_values.to(self.world.device) for e in examples]
        captions = [[t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE] for e in examples]
        # Off the CPU, the head's caption tensors (made from lists) need the default device set.
        on_device = torch.device(self.world.device) if self.world.device.type != "cpu" else nullcontext()
        with on_device, self.precision.autocast():
            loss = self.head(self.model, pixels, captions)
        self.precision.backward(loss.float())
        self._optimizer_step()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        optimizer_step(self.optimizer, self.scheduler, self.cfg.clip_norm, self.precision.scaler)

    # ------------------------------------------------------------------ evaluation
    def plain_model(self):
        """The model as one module on this process: itself, or, sharded, its parameters gathered
        into an unsharded copy on rank 0 (None on the others; every process must call this)."""
        if not self.sharded:
            return self.model
        from omnifuse.model import build_model
        from omnifuse.training.distributed import full_state_dict

        state = full_state_dict(self.model)
        if not self.main:
            return None
        plain = build_model(self.model_config).to(self.world.device)
        plain.load_state_dict(state)
        return plain

    def evaluate(self, source=None, size: int | None = None, batch_size: int = 32, model=None) -> dict:
        """Validation loss and exact-match accuracy of greedy answers, overall and per skill, on
        ``source`` (default: the validation records; none in the contrastive stage)."""
        source = source if source is not None else self.val_source
        if source is None or self.head is not None:
            return {}
        return evaluate(model or self.model, self.tokenizer, self.reader, source, self.cfg.max_new_tokens, size,
                        batch_size, self.precision)

    def _evaluate_on_main(self) -> dict:
        if self.sharded and (self.val_source is None or self.head is not None):
            return {}
        plain = self.plain_model()
        result = self.evaluate(model=plain) if self.main else {}
        self.world.barrier()
        return result

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> int:
        """The step to start from: out_dir's latest checkpoint's (restored), or 0."""
        path = latest_checkpoint(self.out_dir) if self.cfg.resume else None
        if path is None:
            self.metrics.restart()  # a fresh run starts a fresh log
            return 0
        load = load_sharded_training_state if self.sharded else load_training_state
        state = load(path, self.model, self.optimizer, self.scheduler, self.precision.scaler)
        step = int(state["step"])
        self.metrics.keep_until(step)  # forget what was logged after that checkpoint
        return step

    def _checkpoint(self, step: int) -> None:
        self.world.barrier()
        if self.sharded:
            save_sharded_training_state(self.out_dir, step, self.model, self.plain_model(), self.optimizer,
                                        self.scheduler, {"config": config_dict(self.cfg)}, self.world,
                                        keep=self.cfg.keep_checkpoints, scaler=self.precision.scaler)
        elif self.main:
            save_training_state(self.out_dir, step, self.model, self.optimizer, self.scheduler,
                                {"config": config_dict(self.cfg)}, keep=self.cfg.keep_checkpoints,
                                scaler=self.precision.scaler)

    # ------------------------------------------------------------------ the run
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
                record = {"step": done, "loss": None if math.isnan(loss) else loss, "lr": self.scheduler.get_last_lr()[0],
                          **self.router_losses}
                self.router_losses = {}
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    last_eval = self._evaluate_on_main()
                    record.update(last_eval)
                self.metrics.append(record)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self._checkpoint(done)
        if start < cfg.steps and self.rows_trained == 0:
            # Nothing was learned: a checkpoint and a loss would only pretend otherwise.
            raise DataFormatError(f"no training step had a usable row: {self.reader.unusable_reasons()}")
        last_eval = self._evaluate_on_main()
        self.metrics.append({"step": cfg.steps, "final": True, **last_eval})
        self._checkpoint(cfg.steps)
        self.world.barrier()
        self.world.close()
        return {"steps": cfg.steps, "loss": None if math.isnan(loss) else loss, "dropped": self.builder.dropped,
                "skipped_media": len(self.reader.skipped_media), **last_eval, "seconds": time.perf_counter() - t0,
                "trainable": self.trainable}
