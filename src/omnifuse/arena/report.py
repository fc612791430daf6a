"""The arena's outputs: ``report.md``, two PNG plots, and the summary table on the console."""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_intervals", "print_summary", "write_report"]

_COST_COLUMNS = [
    ("parameters", "params", "{:,.0f}"),
    ("active_parameters", "active params", "{:,.0f}"),
    ("visual_tokens_per_image", "visual tokens / image", "{:.0f}"),
    ("audio_tokens_per_second", "audio tokens / s", "{:.0f}"),
    ("video_tokens_per_frame", "video tokens / frame", "{:g}"),
    ("context_tokens_per_sample", "context tokens / sample", "{:.1f}"),
    ("kv_cache_bytes_per_sample", "KV cache / sample", "{:,.0f} B"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("train_seconds", "train s", "{:.0f}"),
]


def _encoder_training(t: dict) -> str:
    chosen = t["train_encoder"]
    scale = t.get("encoder_lr_scale", 1.0)
    at = f" at {scale:g}x the learning rate" if scale != 1.0 else ""
    if chosen is True:
        return f"fine-tuned{at} after that"
    if not chosen:
        return "frozen after that"
    others = [m for m in chosen if m != "image"]
    vision = f"fine-tuned{at} after that" if "image" in chosen else "frozen after that"
    return vision + (f"; the {' and '.join(others)} encoders trained from scratch{at}" if others else "")


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The cost columns some strategy has (audio and video ones only for models that take them,
    active parameters only where some strategy has idle experts)."""
    sparse = any(r.get("active_parameters", r["parameters"]) != r["parameters"] for r in rows)
    return [c for c in _COST_COLUMNS if any(c[0] in r for r in rows) and (sparse or c[0] != "active_parameters")]


def _media_tokens(r: dict) -> str:
    """Tokens of an image / a second of audio / a video frame, for the console table."""
    parts = [(r.get("visual_tokens_per_image"), "img"), (r.get("audio_tokens_per_second"), "s"),
             (r.get("video_tokens_per_frame"), "frame")]
    return " · ".join(f"{v:g}/{unit}" for v, unit in parts if v is not None)


def _weights(t: dict) -> str:
    weights = t.get("skill_weights") or {}
    if not weights:
        return ""
    return " Training samples per skill are weighted (" + ", ".join(f"{k} x{v}" for k, v in weights.items()) + \
        "; the others x1); test samples are balanced."


def _distances(skills: list[str]) -> list[tuple[int, str]]:
    """(N, skill) of the long-context recall-N skills, nearest first."""
    from omnifuse.training.diagnostic_text import recall_distance

    return sorted((recall_distance(s), s) for s in skills if recall_distance(s) is not None)


def _acc(r: dict, skill: str) -> float:
    return r.get(f"accuracy/{skill}", float("nan"))


def add_intervals(report: dict) -> None:
    """Each strategy's 95% Wilson interval per skill and overall (``interval``), from its pooled
    test answers (every seed's)."""
    from omnifuse.arena.stats import wilson

    for r in report["strategies"]:
        keys = [(s, f"accuracy/{s}", f"count/{s}") for s in report["skills"]] + [("overall", "accuracy", "count")]
        r["interval"] = {name: wilson(r[acc] * r.get(n, 0), r.get(n, 0)) for name, acc, n in keys}


def _cell(r: dict, skill: str, key: str) -> str:
    lo, hi = r["interval"][skill]
    sd = r.get(f"{key}_sd")
    spread = f" ±{sd:.1%} sd" if sd is not None else ""
    return f"{r[key]:.1%} [{100 * lo:.1f}–{100 * hi:.1f}]{spread}"


def write_report(report: dict, out: Path) -> None:
    from omnifuse.arena.stats import compression_findings, findings

    add_intervals(report)
    skills, chance, rows = report["skills"], report["chance"], report["strategies"]
    columns = _columns(rows)
    seeds = report.get("seeds") or [report["train"]["seed"]]
    plot_accuracy(report, out / "accuracy_per_skill.png")
    plot_accuracy_vs_cache(report, out / "accuracy_vs_kv_cache.png")
    compression = compression_findings(rows, skills, chance)
    if compression:
        plot_skills_vs_tokens(report, out / "accuracy_vs_tokens.png")
    distances = _distances(skills)
    if distances:
        plot_accuracy_vs_distance(report, out / "accuracy_vs_distance.png")
    t = report["train"]
    lines = [
        "# Fusion arena",
        "",
        f"Every strategy trained on the built-in diagnostic set with the same budget: {t['steps']} steps "
        f"of batch {t['batch_size']}, learning rate {t['lr']}, seed {t['seed']}, {t['image_size']} px images, "
        + (f"all from the same vision encoder, pre-trained contrastively for {report['pretrain_steps']} steps "
           f"({_encoder_training(t)}); " if report.get("pretrain_steps")
           else "from scratch; ") +
        f"accuracy is exact match of greedy answers on {report['test_size']} test samples (a split no training "
        f"sample comes from)." + _weights(t) + f" Total time {report['seconds']:.0f} s." + (" **Quick run: too short to compare.**" if report["quick"] else ""),
        "",
        "## Accuracy per skill",
        "",
        "Each cell: accuracy [95% Wilson interval]"
        + (f", the mean over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) ± their standard deviation, "
           "the interval from all seeds' answers pooled." if len(seeds) > 1 else
           f" (one training seed, {seeds[0]}; `omnifuse arena --seeds N` repeats training to show the spread)."),
        "",
        "| strategy | " + " | ".join(skills) + " | overall |",
        "|---|" + "---:|" * (len(skills) + 1),
    ]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r, s, f"accuracy/{s}") for s in skills)
                     + f" | {_cell(r, 'overall', 'accuracy')} |")
    lines.append("| *chance* | " + " | ".join(f"{chance[s]:.1%}" for s in skills) + " | |")
    lines += ["", "![accuracy per skill](accuracy_per_skill.png)", "", "## What the intervals show", "",
              "A difference is claimed only where the 95% intervals do not overlap (against chance: the "
              "interval's lower end is above it).", "", *[f"- {f}" for f in findings(rows, skills, chance)],
              "", "## Cost", "",
              "| strategy | fusion | " + " | ".join(h for _, h, _ in columns) + " |",
              "|---|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['fusion']} | "
                     + " | ".join(f.format(r[k]) if k in r else "–" for k, _, f in columns) + " |")
    lines += ["", "Media tokens are what the encoder and connector make; early fusion puts each in the "
              "sequence, cross-attention fusion keeps them as cross-attention states and gives each item one "
              "position. KV cache per sample counts the self-attention cache of the prompt and answer, plus the "
              "cross-attention states of its media for cross-attention models (float32). Prefill: the median over "
              "one test sample of each skill, batch 1; decode: batch 1, tokens per second after the first.", "",
              "![accuracy against KV cache](accuracy_vs_kv_cache.png)", ""]
    if compression:
        lines += ["## Compression and fine-grained detail", "",
                  "Does an image compressed into fewer tokens lose the detail that reading text and counting "
                  "need? Each strategy with fewer visual tokens per image against the one with the most "
                  "(accuracy [95% interval]):", "", *[f"- {f}" for f in compression], "",
                  "![accuracy per skill against tokens and KV cache](accuracy_vs_tokens.png)", ""]
    if distances:
        lines += ["## Long context", "",
                  "A key stated at the start of the prompt, then N characters (tokens) of distractors, then the "
                  "question. Each cell: accuracy [95% interval] · the KV cache of one such sample (its attention "
                  "caches and any compressive memory, float32).", "",
                  "| strategy | " + " | ".join(f"N = {n}" for n, _ in distances) + " |",
                  "|---|" + "---:|" * len(distances)]
        for r in rows:
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{_cell(r, s, f'accuracy/{s}')} · {r[f'kv_cache_bytes/{s}'] / 1024:,.0f} KiB"
                if f"kv_cache_bytes/{s}" in r else _cell(r, s, f"accuracy/{s}") for _, s in distances) + " |")
        lines += ["", "![accuracy and cache against distance](accuracy_vs_distance.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills, rows = report["skills"], report["strategies"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(1.4 * len(skills) + 2, 4))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(skills))]
        acc = [_acc(r, s) for s in skills]
        err = [[max(0.0, a - r["interval"][s][0]) for a, s in zip(acc, skills)],  # rounding at 0 and 1
               [max(0.0, r["interval"][s][1] - a) for a, s in zip(acc, skills)]]
        bars = ax.bar(xs, acc, width, yerr=err, capsize=2, error_kw={"elinewidth": 0.8},
                      label=f"{r['name']} ({r['fusion']})")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=6)
    for j, s in enumerate(skills):
        ax.hlines(report["chance"][s], j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(skills)), skills)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy (exact match)")
    ax.set_title("Accuracy per skill (whiskers: 95% Wilson intervals)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows) + 1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_cache(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in report["strategies"]:
        ax.scatter(r["kv_cache_bytes_per_sample"] / 1024, r["accuracy"], s=60)
        ax.annotate(f"{r['name']}\n{_media_tokens(r)} tokens", (r["kv_cache_bytes_per_sample"] / 1024, r["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("KV cache per sample (KiB, float32)")
    ax.set_ylabel("overall test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, 1.4 * max(r["kv_cache_bytes_per_sample"] for r in report["strategies"]) / 1024)  # room for labels
    ax.set_title("Accuracy against KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_distance(report: dict, path: Path) -> None:
    """Left: recall accuracy against the key's distance, one line per strategy (whiskers: 95%
    intervals, dashed: chance). Right: the KV cache of one sample at that distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances = _distances(report["skills"])
    xs = [n for n, _ in distances]
    fig, (acc_ax, kv_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in report["strategies"]:
        acc = [_acc(r, s) for _, s in distances]
        err = [[max(0.0, a - r["interval"][s][0]) for a, (_, s) in zip(acc, distances)],
               [max(0.0, r["interval"][s][1] - a) for a, (_, s) in zip(acc, distances)]]
        acc_ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=r["name"])
        if all(f"kv_cache_bytes/{s}" in r for _, s in distances):
            kv_ax.plot(xs, [r[f"kv_cache_bytes/{s}"] / 1024 for _, s in distances], marker="o", label=r["name"])
    acc_ax.axhline(report["chance"][distances[0][1]], color="black", ls="dashed", lw=0.8, label="chance")
    for ax in (acc_ax, kv_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(n) for n in xs])
        ax.minorticks_off()
        ax.set_xlabel("distractor tokens between the key and the question")
        ax.legend(fontsize=8)
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("test accuracy (exact match)")
    acc_ax.set_title("Recall against distance")
    kv_ax.set_ylim(bottom=0)
    kv_ax.set_ylabel("KV cache per sample (KiB, float32)")
    kv_ax.set_title("Cache against distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_skills_vs_tokens(report: dict, path: Path) -> None:
    """Accuracy of every skill (and overall) against visual tokens per image (top row) and KV
    cache per sample (bottom row), one point per strategy with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["strategies"] if r.get("visual_tokens_per_image")]
    panels = [*report["skills"], "overall"]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.3 * len(panels), 5.2), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (key, label) in enumerate([("visual_tokens_per_image", "visual tokens / image"),
                                        ("kv_cache_bytes_per_sample", "KV cache / sample (KiB)")]):
        for col, skill in enumerate(panels):
            ax = axes[row][col]
            acc_key = "accuracy" if skill == "overall" else f"accuracy/{skill}"
            for i, r in enumerate(rows):
                # strategies with the same value sit side by side (a small offset: ~4% on the log
                # axis of tokens, 1% on the cache axis)
                offset = i - (len(rows) - 1) / 2
                x = r[key] / (1024 if row else 1) * (1 + 0.01 * offset if row else 2 ** (0.06 * offset))
                lo, hi = r["interval"][skill]
                a = r[acc_key]
                ax.errorbar([x], [a], yerr=[[max(0.0, a - lo)], [max(0.0, hi - a)]], fmt="o", ms=5, capsize=2,
                            color=colours[i % len(colours)], label=r["name"] if (row, col) == (0, 0) else None)
            if skill != "overall":
                ax.axhline(report["chance"][skill], color="black", ls="dashed", lw=0.8)
            if row == 0:
                ax.set_xscale("log", base=2)  # token counts step by factors of 2
                ax.set_title(skill, fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("test accuracy")
    axes[1][0].set_ylabel("test accuracy")
    fig.legend(loc="lower center", ncol=len(rows), fontsize=8, frameon=False)
    fig.suptitle("Accuracy per skill against image tokens and cache (dashed: chance; whiskers: 95% intervals)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict, console) -> None:
    """Two tables: accuracy per skill (with chance), then what each strategy costs per sample."""
    from rich.table import Table

    skills = report["skills"]
    table = Table(title="fusion arena: test accuracy per skill")
    table.add_column("strategy")
    for s in skills:
        table.add_column(s, justify="right")
    table.add_column("overall", justify="right")
    for r in report["strategies"]:
        table.add_row(f"{r['name']} ({r['fusion']})", *[f"{_acc(r, s):.0%}" for s in skills], f"{r['accuracy']:.0%}")
    table.add_row("chance", *[f"{report['chance'][s]:.0%}" for s in skills], "")
    console.print(table)
    costs = Table(title="fusion arena: cost per sample")
    costs.add_column("strategy")
    costs.add_column("params", justify="right")
    for col in ("media tokens", "context tokens", "KV cache", "prefill ms", "decode tok/s"):
        costs.add_column(col, justify="right")
    for r in report["strategies"]:
        active = r.get("active_parameters", r["parameters"])
        costs.add_row(f"{r['name']} ({r['fusion']})",
                      f"{r['parameters'] / 1e6:.2f}M" + (f" ({active / 1e6:.2f}M active)" if active != r["parameters"] else ""),
                      _media_tokens(r), f"{r['context_tokens_per_sample']:.0f}",
                      f"{r['kv_cache_bytes_per_sample'] / 1024:,.0f} KiB", f"{r['prefill_ms']:.1f}",
                      f"{r['decode_tokens_per_s']:.0f}")
    console.print(costs)
