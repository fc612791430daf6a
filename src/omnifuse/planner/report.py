"""Tables and plots for plans: one model in detail, several side by side, predicted vs measured."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_table", "measure_table", "plan_table", "plot_plans"]


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _bytes(x: float | None) -> str:
    if x is None:
        return "–"
    for scale, unit in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _seconds(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 1e-3:
        return f"{x * 1e6:.3g} µs"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _usd(x: float | None) -> str:
    return "–" if x is None else f"${x:,.2f}"


def _states(x: dict) -> str:
    """Cross-attention states attended at decode, and those encoded at prefill where they differ."""
    decode, prefill = x["cross_attention_states_decode"], x["cross_attention_states_prefill"]
    return f"{decode:,}" if decode == prefill else f"{decode:,} (prefill {prefill:,})"


def _input_label(i: dict) -> str:
    if i["kind"] == "image":
        return f"image {i['width']}x{i['height']}"
    if i["kind"] == "video":
        size = f" {i['width']}x{i['height']}" if i.get("width") else ""
        return f"video {i['seconds']:g} s{size}"
    return f"audio {i['seconds']:g} s"


def plan_table(p: dict[str, Any]):
    """One model: inputs, then a two-column summary."""
    from rich.table import Table

    title = p["model"] + ("  (estimated)" if p["estimated"] else "")
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_column("detail", style="dim")
    for i in p["inputs"]:
        detail = i.get("note", "")
        value = f"{i['tokens']:,} token{'s' if i['tokens'] != 1 else ''}"
        if i["cross_attention_states_prefill"]:
            value += f" + {_states(i)} cross states"
        t.add_row(_input_label(i), value, detail)
    if p["text_tokens"] or p["output_tokens"]:
        t.add_row("text / output", f"{p['text_tokens']:,} / {p['output_tokens']:,} tokens", "")
    window = f"of {p['context_window']:,}" if p["context_window"] else ""
    fits = "" if p["fits_context"] is not False else "  EXCEEDS THE CONTEXT WINDOW"
    t.add_row("context tokens", f"{p['context_tokens']:,}", window + fits)
    if p["fusion"] == "cross":
        t.add_row("cross states (prefill)", f"{p['cross_attention_states_prefill']:,}",
                  "cross-attention states encoded and cached at prefill, beside the context")
        t.add_row("cross states (decode)", f"{p['cross_attention_states_decode']:,}",
                  "cross-attention states attended at decode: all the decode cache keeps")
    if p["parameters"]:
        pr = p["parameters"]
        active = f" ({_si(pr['active'])} active)" if pr["active"] != pr["total"] else ""
        t.add_row("parameters", _si(pr["total"]) + active,
                  "  ".join(f"{k} {_bytes(v)}" for k, v in p["weight_bytes"].items()))
        kinds = p["kv_cache_bytes_by_kind"]
        cross = ""
        if p["fusion"] == "cross":
            cross = (f", cross {_bytes(kinds['cross_attention_decode'])} at decode "
                     f"({_bytes(kinds['cross_attention_prefill'])} at prefill)")
        t.add_row(f"KV cache / request ({p['kv_dtype']})", _bytes(p["kv_cache_bytes"]),
                  f"held while decoding: self {_bytes(kinds['self_attention'])}{cross}")
        parts = p["prefill_flops_by_part"]
        t.add_row("prefill FLOPs", _si(p["prefill_flops"]), "  ".join(f"{k} {_si(v)}" for k, v in parts.items()))
        t.add_row("decode FLOPs / token", _si(p["decode_flops_per_token"]), "first generated token")
    if p["latency"]:
        lat, srv = p["latency"], p["serving"]
        t.add_row(f"prefill on {lat['accelerator']}", _seconds(lat["prefill_s"]), "roofline (lower bound)")
        t.add_row("decode step", _seconds(lat["decode_s_per_token"]),
                  f"batch {srv['concurrency']}: {lat['decode_tokens_per_s']:,.0f} tok/s"
                  + ("" if srv["concurrency_choice"].startswith("set by") else f" ({srv['concurrency_choice']})"))
        t.add_row("GPUs per replica", f"{srv['gpus_per_replica']}",
                  f"{_bytes(srv['memory_bytes'])} of weights + cache at {srv['dtype']}")
        if "gpus" in srv:
            t.add_row("GPUs for the workload", f"{srv['gpus']}", f"{srv['replicas']} replica(s)")
    if p.get("cost"):
        c = p["cost"]
        t.add_row("API $/day", _usd(c["api_usd_per_day"]),
                  f"{c['requests_per_day']:,} requests, prices of {c['prices_date']}")
        if c["self_hosted_usd_per_day"] is not None:
            t.add_row("self-hosted $/day", _usd(c["self_hosted_usd_per_day"]), f"at ${c['gpu_usd_per_hour']}/GPU-hour")
    for note in p["notes"]:
        t.add_row("note", "", note)
    return t


def compare_table(plans: list[dict[str, Any]]):
    from rich.table import Table

    t = Table(title="models side by side", header_style="bold")
    for col, justify in (("model", "left"), ("fusion", "left"), ("media tokens", "right"),
                         ("cross states decode / prefill", "right"),
                         ("context", "right"), ("params", "right"), ("KV cache", "right"), ("prefill FLOPs", "right"),
                         ("decode FLOPs/tok", "right"), ("API $/day", "right"), ("self-host $/day", "right")):
        t.add_column(col, justify=justify)
    for p in plans:
        cost = p.get("cost") or {}
        over = " (over)" if p["fits_context"] is False else ""
        t.add_row(p["model"] + (" *" if p["estimated"] else ""), p["fusion"],
                  f"{sum(i['tokens'] for i in p['inputs']):,}",
                  f"{p['cross_attention_states_decode']:,} / {p['cross_attention_states_prefill']:,}",
                  f"{p['context_tokens']:,}{over}",
                  _si(p["parameters"]["total"]) if p["parameters"] else "–", _bytes(p["kv_cache_bytes"]),
                  _si(p["prefill_flops"]), _si(p["decode_flops_per_token"]),
                  _usd(cost.get("api_usd_per_day")), _usd(cost.get("self_hosted_usd_per_day")))
    return t


def measure_table(rows: list[tuple[str, Any, Any, str]]):
    from rich.table import Table

    t = Table(title="predicted vs measured", header_style="bold")
    for col in ("quantity", "predicted", "measured", "agreement"):
        t.add_column(col, justify="left" if col == "quantity" else "right")
    for name, pred, meas, verdict in rows:
        t.add_row(name, f"{pred:,}" if isinstance(pred, int) else str(pred),
                  f"{meas:,}" if isinstance(meas, int) else str(meas), verdict)
    return t


def plot_plans(plans: list[dict[str, Any]], path: str) -> None:
    """Tokens per model (context tokens and cross-attention states attended at decode) and, when
    priced, $/day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = [p["model"] for p in plans]
    priced = any(p.get("cost") for p in plans)
    fig, axes = plt.subplots(1, 2 if priced else 1, figsize=(13 if priced else 7, 0.55 * len(plans) + 2),
                             squeeze=False)
    ax = axes[0][0]
    y = list(range(len(plans)))
    context = [p["context_tokens"] for p in plans]
    states = [p["cross_attention_states_decode"] for p in plans]
    ax.barh(y, context, color="#4477aa", label="context tokens")
    ax.barh(y, states, left=context, color="#ee6677", label="cross-attention states (decode)")
    for i, (c, s) in enumerate(zip(context, states)):
        ax.text(c + s, i, f" {c:,} + {s:,} states" if s else f" {c:,}", va="center", fontsize="small")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:g}k" if x else "0"))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("tokens per request")
    ax.set_title("tokens per request")
    ax.margins(x=0.25)
    ax.legend(loc="lower right", fontsize="small")
    if priced:
        ax = axes[0][1]
        for offset, key, colour, label in ((-0.2, "api_usd_per_day", "#228833", "vendor API"),
                                           (0.2, "self_hosted_usd_per_day", "#ccbb44", "self-hosted")):
            values = [(p.get("cost") or {}).get(key) for p in plans]
            ax.barh([i + offset for i in y], [v or 0 for v in values], height=0.4, color=colour, label=label)
            for i, v in enumerate(values):
                ax.text(v or 0, i + offset, f" ${v:,.0f}" if v is not None else " n/a", va="center",
                        fontsize="x-small")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("USD per day")
        ax.set_title(f"cost per day ({plans[0]['cost']['requests_per_day']:,} requests)" if plans[0].get("cost")
                     else "cost per day")
        ax.margins(x=0.2)
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
