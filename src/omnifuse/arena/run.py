"""Train every strategy of the arena config on the diagnostic set with the same budget, evaluate
each skill on the test split, measure tokens, cache, latency and throughput, and write the report.

A strategy is a config entry (a name, a model preset or model config file, optional training
overrides), so new fusion strategies join by editing the arena config (the default,
``omnifuse/configs/arena.yaml``, ships inside the package), not this code. An entry with ``from``
trains nothing: it evaluates another strategy's trained model with inference-time changes (token
merging: ``merge_tokens``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnifuse.config import ConfigError, read_yaml
from omnifuse.training.config import TrainConfig, resolve_input_paths

__all__ = ["ArenaConfig", "Strategy", "load_arena_config", "run_arena"]

# Package data (pyproject's package-data), so `omnifuse demo` and `omnifuse arena` run from an
# installed wheel; the model files it names sit beside it in configs/models/.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "arena.yaml"


@dataclass(frozen=True)
class Strategy:
    name: str
    model: str  # preset name or model config file (relative paths: to the arena config's folder)
    overrides: dict = field(default_factory=dict)  # TrainConfig fields for this strategy only
    source: str | None = None  # ``from``: evaluate this (earlier) strategy's trained model instead of training
    merge_tokens: int = 0  # with ``from``: token merging (ToMe's r) in its vision encoder at inference


@dataclass(frozen=True)
class ArenaConfig:
    strategies: tuple[Strategy, ...]
    train: dict  # TrainConfig fields shared by all strategies (same data, steps, batch, seed)
    test_size: int = 300
    out_dir: str = "runs/arena"
    quick_steps: int = 60  # --quick: steps per strategy
    param_tolerance: float = 0.10  # strategies' parameter counts must agree within this fraction
    # which count: total, or active (what a token runs through: a mixture of experts against a dense
    # model of the same compute per token)
    match: str = "total"
    latency_prompts: int = 5
    decode_tokens: int = 32
    # Shared image-text pre-training of the vision encoder before the strategies train (as LLaVA
    # and Llama 3.2 Vision start from a pre-trained encoder): TrainConfig fields of a contrastive
    # run; every strategy then starts from the same encoder weights. Empty: no pre-training.
    pretrain: dict = field(default_factory=dict)


def load_arena_config(path: str | Path | None = None) -> ArenaConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"arena config not found: {path}")
    data = read_yaml(path, "arena config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"arena config {path} must hold a mapping of settings")
    entries = data.pop("strategies", None)
    if not entries:
        raise ConfigError(f"{path} lists no strategies")
    strategies: list[Strategy] = []
    for i, e in enumerate(entries):
        if isinstance(e, dict) and "from" in e:
            strategies.append(_derived_strategy(path, e, strategies))
            continue
        if not isinstance(e, dict) or "name" not in e or "model" not in e:
            raise ConfigError(f"{path}: strategy {i} needs a name and a model (or `from` another strategy)")
        if "merge_tokens" in e:
            raise ConfigError(f"{path}: strategy {e['name']!r}: merge_tokens is an inference setting; give it with "
                              "`from: <a trained strategy>`")
        model = resolve_input_paths({"model": str(e["model"])}, path.parent)["model"]
        overrides = e.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: strategy {e['name']!r}: overrides must be a mapping of settings")
        strategies.append(Strategy(e["name"], model, resolve_input_paths(overrides, path.parent)))
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: strategy names repeat: {names}")
    known = {f.name for f in dataclasses.fields(ArenaConfig)} - {"strategies", "train"}
    arena = {k: data.pop(k) for k in list(data) if k in known}
    if arena.get("match", "total") not in ("total", "active"):
        raise ConfigError(f"{path}: match must be total or active (parameters), got {arena['match']!r}")
    return ArenaConfig(strategies=tuple(strategies), train=resolve_input_paths(data, path.parent), **arena)


def _derived_strategy(path: Path, e: dict, earlier: list[Strategy]) -> Strategy:
    """An entry ``{name, from, merge_tokens}``: another strategy's trained model at inference."""
    name = e.get("name")
    unknown = set(e) - {"name", "from", "merge_tokens"}
    if not name or unknown:
        raise ConfigError(f"{path}: strategy {name!r} with `from` takes only name, from and merge_tokens"
                          + (f" (got {sorted(unknown)})" if unknown else ""))
    source = next((s for s in earlier if s.name == e["from"] and s.source is None), None)
    if source is None:
        raise ConfigError(f"{path}: strategy {name!r}: `from: {e['from']}` must name a trained strategy listed "
                          "before it")
    r = e.get("merge_tokens", 0)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"{path}: strategy {name!r}: merge_tokens must be a positive integer, got {r!r}")
    return Strategy(name, source.model, source.overrides, source=source.name, merge_tokens=r)


def _train_config(arena: ArenaConfig, strategy: Strategy, quick: bool) -> TrainConfig:
    fields = {**arena.train, **strategy.overrides, "model": strategy.model,
              "out_dir": str(Path(arena.out_dir) / strategy.name), "resume": False}
    if quick:
        fields.update(steps=arena.quick_steps, warmup_steps=min(arena.quick_steps // 5, fields.get("warmup_steps", 0)),
                      train_size=min(fields.get("train_size", 2000), 2000))
    try:
        return TrainConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"strategy {strategy.name}: {e}") from None


# What one image, one second of audio and one video frame cost in tokens (omnifuse info's figures).
_RATES = ("visual_tokens_per_image", "audio_tokens_per_second", "video_tokens_per_frame")


@torch.inference_mode()
def _measure(trainer, test_source, arena: ArenaConfig) -> dict[str, Any]:
    """Media tokens, context, KV cache bytes, prefill latency and decode speed on test prompts."""
    from omnifuse.inference import SamplingConfig, generate_stream
    from omnifuse.planner.costs import item_cost, model_info, request_cost

    model, cfg = trainer.model.eval(), trainer.model_config
    rows = []  # (prompt ids, media items in prompt order, answer tokens, skill)
    for i in range(min(len(test_source), 10 * len(set(trainer.cfg.skills)))):
        record = test_source[i]
        media = trainer.reader.media(record, i)
        if media is None:
            continue
        ids, items = trainer.builder.prompt_and_media(record[0][:-1], media)
        answer = len(trainer.tokenizer.encode(record[2]["answer"], add_bos=False)) + 1  # + stop token
        rows.append((ids, items, answer, record[2]["skill"]))
    kv = [request_cost(cfg, len(ids) + answer, [item_cost(cfg, x, model.processors) for x in items])
          .kv_cache_bytes.decode for ids, items, answer, _ in rows]
    per_skill = {}  # skills differ in context (the recall-N skills by N)
    for skill in dict.fromkeys(row[3] for row in rows):
        mine = [k for k, row in enumerate(rows) if row[3] == skill]
        per_skill[f"kv_cache_bytes/{skill}"] = statistics.mean(kv[k] for k in mine)
        per_skill[f"context_tokens/{skill}"] = statistics.mean(len(rows[k][0]) for k in mine)
    # one prompt of each skill (every modality mix the test set has), repeated up to latency_prompts
    first_of_skill = list({skill: (ids, items) for ids, items, _, skill in reversed(rows)}.values())[::-1]
    prompts = [first_of_skill[k % len(first_of_skill)] for k in range(max(arena.latency_prompts, len(first_of_skill)))]
    prefill = []
    for ids, items in prompts:
        cache = model.new_cache(1, len(ids) + 1)
        t0 = time.perf_counter()
        model(torch.tensor([ids], device=model.device), images=[items], cache=cache, last_only=True)
        prefill.append(time.perf_counter() - t0)
    n = arena.decode_tokens
    t_steps = []
    for _ in range(2):
        t_prev, times = time.perf_counter(), []
        for _step in generate_stream(model, [rows[0][0]], [rows[0][1]], SamplingConfig(max_new_tokens=n + 1)):
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
        t_steps.append(sum(times[1:]) / max(1, len(times) - 1))
    return {
        **{k: v for k, v in model_info(cfg).items() if k in _RATES},
        "context_tokens_per_sample": statistics.mean(len(ids) for ids, *_ in rows),
        "kv_cache_bytes_per_sample": statistics.mean(kv),
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_tokens_per_s": 1 / min(t_steps),
        **per_skill,
    }


def _pool(runs: list[dict], skills: list[str]) -> dict:
    """One strategy over several seeds: mean accuracies, their spread (sample standard deviation),
    pooled sample counts (the test answers of every seed), costs of the first run."""
    first = dict(runs[0])
    if len(runs) == 1:
        return first
    for key in ["accuracy", *(f"accuracy/{s}" for s in skills)]:
        values = [r[key] for r in runs]
        first[key] = statistics.mean(values)
        first[f"{key}_sd"] = statistics.stdev(values)
        first[f"{key}_runs"] = values
    for key in ["count", *(f"count/{s}" for s in skills)]:
        first[key] = sum(r[key] for r in runs)
    first["train_seconds"] = statistics.mean(r["train_seconds"] for r in runs)
    return first


def run_arena(config: ArenaConfig, quick: bool = False, console=None, seeds: int = 1) -> dict:
    """Train and test every strategy (``seeds`` times, with seeds ``seed``, ``seed + 1``, ...: the
    report gives means, spreads and pooled intervals), write the report and return it."""
    import sys

    from rich.console import Console

    from omnifuse.arena.report import print_summary, write_report
    from omnifuse.planner.costs import active_parameters, count_parameters
    from omnifuse.training.diagnostic import chance_level
    from omnifuse.training.loop import Trainer
    from omnifuse.training.sources import DiagnosticSource

    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = [(s, _train_config(config, s, quick)) for s in config.strategies]
    counts = {}
    for s, tc in plans:
        model_config = _model_config(tc)
        total = count_parameters(model_config)["total"]
        counts[s.name] = {"total": total, "active": active_parameters(model_config, total)}
    params = {name: c["total"] for name, c in counts.items()}
    matched = {name: c[config.match] for name, c in counts.items()}
    low, high = min(matched.values()), max(matched.values())
    if high > low * (1 + config.param_tolerance):
        raise ConfigError(f"strategies' {config.match} parameter counts differ by more than "
                          f"{config.param_tolerance:.0%}: {matched}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    runs: dict[str, list[dict]] = {s.name: [] for s, _ in plans}
    t_start = time.perf_counter()
    encoder, pretrain_steps = _pretrain_encoder(config, plans, quick, console) if config.pretrain else (None, 0)
    # Every strategy starts from the same pre-trained encoder; while it stays frozen its output for
    # a training image is the same in every strategy, so each image is encoded once for all.
    shared_features: dict | None = {} if encoder is not None else None
    for k in range(seeds):
        for strategy, base in plans:
            if strategy.source is not None:
                continue  # evaluated right after the strategy it comes from trained
            tc = base if seeds == 1 else dataclasses.replace(base, seed=base.seed + k,
                                                             out_dir=str(Path(base.out_dir) / f"seed-{base.seed + k}"))
            active = counts[strategy.name]["active"]
            console.print(f"[bold]{strategy.name}[/]: {params[strategy.name]:,} parameters"
                          + (f" ({active:,} active)" if active != params[strategy.name] else "") + f", {tc.steps} steps of "
                          f"{tc.batch_size * tc.grad_accum} samples" + (f", seed {tc.seed}" if seeds > 1 else ""))
            trainer = Trainer(tc, shared_features=shared_features)
            if encoder is not None:
                trainer.model.vision_encoder.load_state_dict(encoder)
            t0 = time.perf_counter()
            summary = trainer.run()
            train_seconds = time.perf_counter() - t0
            test = DiagnosticSource("test", config.test_size, base)  # one test set for every seed
            scores = trainer.evaluate(test)
            measured = _measure(trainer, test, config) if k == 0 else {}
            fusion = trainer.model_config.fusion.type if trainer.model_config.modalities else "text only"
            row = {"name": strategy.name, "model": strategy.model, "fusion": fusion,
                   "parameters": params[strategy.name], "active_parameters": counts[strategy.name]["active"],
                   "steps": tc.steps, "train_seconds": train_seconds,
                   "final_train_loss": summary["loss"]}
            runs[strategy.name].append({**row, **scores, **measured})
            for derived, _ in plans:
                if derived.source == strategy.name:
                    console.print(f"[bold]{derived.name}[/]: {strategy.name}'s model with {derived.merge_tokens} "
                                  "tokens merged per vision encoder layer (ToMe), no training")
                    runs[derived.name].append({**row, "name": derived.name, "train_seconds": 0.0,
                                               "merge_tokens": derived.merge_tokens,
                                               **_evaluate_merged(trainer, test, config, derived.merge_tokens, k == 0)})
    skills = list(plans[0][1].skills)
    results = [_pool(runs[s.name], skills) for s, _ in plans]
    report = {"strategies": results, "chance": {k: chance_level(k) for k in skills}, "skills": skills,
              "quick": quick, "seconds": time.perf_counter() - t_start,
              "train": {k: v for k, v in dataclasses.asdict(plans[0][1]).items()
                        if k in ("steps", "batch_size", "lr", "seed", "train_size", "image_size", "train_encoder",
                                 "encoder_lr_scale", "skill_weights")},
              "pretrain_steps": pretrain_steps,  # as run (--quick runs fewer than the config's)
              "test_size": config.test_size, "match": config.match, "seeds": [plans[0][1].seed + k for k in range(seeds)]}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_report(report, out)
    print_summary(report, console)
    return report


def _evaluate_merged(trainer, test, config: ArenaConfig, r: int, measure: bool) -> dict:
    """Scores (and costs) of ``trainer``'s model with token merging at inference, then back to
    the model as trained. Features the frozen encoder cached without merging are not reused."""
    model, shared = trainer.model, trainer.reader.shared_features
    config_before = trainer.model_config
    model.set_token_merging(r)
    trainer.model_config, trainer.reader.shared_features = model.config, None
    try:
        scores = trainer.evaluate(test)
        return {**scores, **(_measure(trainer, test, config) if measure else {})}
    finally:
        model.set_token_merging(0)
        trainer.model_config, trainer.reader.shared_features = config_before, shared


def _pretrain_encoder(config: ArenaConfig, plans, quick: bool, console) -> tuple[dict, int]:
    """One contrastive run (image-caption pairs of the diagnostic set): (its encoder weights, which
    seed every strategy so all start from the same place, and the steps it ran)."""
    from omnifuse.training.diagnostic import IMAGE_SKILLS
    from omnifuse.training.loop import Trainer

    encoders = {json.dumps(dataclasses.asdict(_model_config(tc).vision), sort_keys=True) for _, tc in plans}
    if len(encoders) != 1:
        raise ConfigError("arena pretrain needs every strategy to use the same vision encoder config")
    first = plans[0][1]
    skills = tuple(s for s in first.skills if s in IMAGE_SKILLS)  # captions describe images
    if not skills:
        raise ConfigError(f"arena pretrain pairs images with captions, but the arena's skills {first.skills} have no image")
    fields = {"model": first.model, "seed": first.seed, "image_size": first.image_size, "skills": skills,
              "skill_weights": {k: v for k, v in first.skill_weights.items() if k in skills}, "train_size": first.train_size, **config.pretrain, "stage": "contrastive",
              "out_dir": str(Path(config.out_dir) / "pretrain"), "resume": False}
    if quick:
        fields.update(steps=max(2, config.quick_steps // 2), warmup_steps=0)
    tc = TrainConfig(**fields)
    console.print(f"[bold]pretrain[/]: contrastive ({tc.contrastive_loss}) image-caption training of the shared "
                  f"vision encoder, {tc.steps} steps of {tc.batch_size} pairs")
    trainer = Trainer(tc)
    trainer.run()
    return trainer.model.vision_encoder.state_dict(), tc.steps


def _model_config(tc: TrainConfig):
    from omnifuse.training.loop import _resolve_model_config

    return _resolve_model_config(tc.model)
