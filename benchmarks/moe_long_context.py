"""Mixture-of-experts decoding and bounded attention against their dense / full counterparts, in one run.

    python benchmarks/moe_long_context.py [--new-tokens 48] [--contexts 1024,2048,4096,8192,16384,32768]
                                          [--plot long_context.png]

About 4 minutes on a 2-core CPU. Random weights, float32, packed linears (as ``omnifuse generate``).

1. MoE decode at batch 1: a Llama-4-style decoder (8 layers of 768; 8 experts of 2048, top-1
   sigmoid routing, a shared expert of 2048, on every layer) against a dense decoder with the same active parameters (a SwiGLU as
   wide as the routed and shared expert together, 4096), and against the same MoE computing every expert
   for every token, as transformers' Llama 4 does. Targets: MoE time per token within 1.3x of the
   dense model's, and at least 3x faster than every expert.
2. Decode tokens/s and cache bytes against the context length for full attention, a
   1024-position sliding window and Infini-attention (1024-position segments), on the same small
   decoder. The caches are filled with random keys and values up to each length (a decode step's
   time does not depend on their values; Infini's memory stays zero), so no 32k-token prefill is
   run. Target: sliding and Infini tokens/s and bytes stay flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig
from omnifuse.inference.cache import RingKVCache
from omnifuse.model import build_model
from omnifuse.nn.moe import MoE
from omnifuse.nn.packed import pack_linears
from omnifuse.planner.resources import machine_line

BASE = DecoderConfig(vocab_size=8000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                     intermediate_size=2048, max_position=40000)
DENSE = dataclasses.replace(BASE, hidden_size=768, num_heads=12, intermediate_size=4096)
MOE = dataclasses.replace(DENSE, layer_pattern=(LayerSpec(feed_forward="moe"),), num_experts=8, experts_per_token=1,
                          router="sigmoid", expert_intermediate_size=2048, shared_expert_intermediate_size=2048)


def _model(decoder: DecoderConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="bench", vision=None, decoder=decoder)).eval()
    pack_linears(model)
    return model


def _all_experts(self: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, the unrouted ones weighted 0 (transformers' Llama4TextMoe)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    _, chosen, weights = self.route(flat)
    scores = torch.zeros(flat.shape[0], self.num_experts, dtype=flat.dtype).scatter(1, chosen, weights)
    out = sum(expert(flat * scores[:, e:e + 1]) for e, expert in enumerate(self.experts))
    if self.shared_expert is not None:
        out = out + self.shared_expert(flat)
    return out.reshape(shape)


def decode_seconds(model, context: int, steps: int, fill: bool = False) -> float:
    """Seconds per decoded token at batch 1 after ``context`` positions (prefilled, or with
    ``fill`` the cache filled with random keys and values)."""
    cache = model.new_cache(1, context + steps + 4)
    kv = cache.self_attn
    with torch.inference_mode():
        if fill:
            _fill(kv, context)
            logits = model(torch.tensor([[1]]), cache=cache, last_only=True)
        else:
            logits = model(torch.randint(0, 8000, (1, context)), cache=cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps + 2):
            if i == 2:  # two warm-up steps
                t0 = time.perf_counter()
            token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps


def _fill(kv, n: int) -> None:
    """A cache holding ``n`` real positions of random keys and values (ring layers their last slots)."""
    for layer in kv.layers:
        if isinstance(layer, RingKVCache):
            r = layer.capacity
            slots = torch.arange(max(0, n - r), n)
            layer.k[0, :, slots % r] = torch.randn(layer.k.shape[1], len(slots), layer.k.shape[3])
            layer.v[0, :, slots % r] = torch.randn_like(layer.v[0, :, slots % r])
            layer.pos[0, slots % r], layer.valid[0, slots % r] = slots, True
        else:
            layer.k[0, :, :n].normal_()
            layer.v[0, :, :n].normal_()
    kv.key_mask[0, :n] = True
    kv.next_position[0] = kv.lengths[0] = n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--plot", default="long_context.png")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    from omnifuse.planner.arch import from_model_config

    moe, dense = _model(MOE), _model(DENSE)
    counts = {name: from_model_config(ModelConfig(name=name, vision=None, decoder=d)).parameters()
              for name, d in (("moe", MOE), ("dense", DENSE))}
    print(f"MoE: {counts['moe']['total'] / 1e6:.0f}M parameters, {counts['moe']['active'] / 1e6:.0f}M active; "
          f"dense: {counts['dense']['total'] / 1e6:.0f}M")
    t_moe = decode_seconds(moe, 64, args.new_tokens)
    t_dense = decode_seconds(dense, 64, args.new_tokens)
    for layer in moe.modules():
        if isinstance(layer, MoE):
            layer.forward = _all_experts.__get__(layer)
    t_all = decode_seconds(moe, 64, args.new_tokens)
    print("\n| decoder (batch 1, 64-token prompt) | ms / token | tok/s |\n|---|---:|---:|")
    for name, t in (("MoE, routed experts only (omnifuse)", t_moe), ("dense, same active parameters", t_dense),
                    ("MoE, every expert (as transformers' Llama 4)", t_all)):
        print(f"| {name} | {t * 1000:.1f} | {1 / t:.1f} |")
    print(f"MoE / dense time: {t_moe / t_dense:.2f}x (target <= 1.3x): {'PASS' if t_moe / t_dense <= 1.3 else 'FAIL'}")
    print(f"every expert / routed: {t_all / t_moe:.2f}x (target >= 3x): {'PASS' if t_all / t_moe >= 3 else 'FAIL'}")

    contexts = [int(c) for c in args.contexts.split(",")]
    kinds = {"full": BASE,
             "sliding (1024)": dataclasses.replace(BASE, layer_pattern=(LayerSpec(attention="sliding"),),
                                                   sliding_window=1024),
             "infini (1024)": dataclasses.replace(BASE, layer_pattern=(LayerSpec(attention="infini"),),
                                                  memory_segment=1024)}
    rows: dict[str, list[tuple[float, int]]] = {}
    for name, decoder in kinds.items():
        model = _model(decoder)
        rows[name] = []
        for n in contexts:
            t = decode_seconds(model, n, max(8, args.new_tokens // 3), fill=True)
            rows[name].append((1 / t, model.new_cache(1, n + 1).nbytes))
    print("\n| context | " + " | ".join(f"{k} tok/s | {k} cache MiB" for k in kinds) + " |")
    print("|---:|" + "---:|---:|" * len(kinds))
    for i, n in enumerate(contexts):
        cells = " | ".join(f"{rows[k][i][0]:.1f} | {rows[k][i][1] / 2**20:.1f}" for k in kinds)
        print(f"| {n} | {cells} |")
    for name in ("sliding (1024)", "infini (1024)"):
        flat = max(r[0] for r in rows[name]) / min(r[0] for r in rows[name])
        same_bytes = len({r[1] for r in rows[name]}) == 1
        print(f"{name}: tok/s spread {flat:.2f}x over the contexts, cache bytes "
              f"{'constant' if same_bytes else 'growing'}: {'PASS' if flat <= 1.3 and same_bytes else 'FAIL'}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for name in kinds:
            a.plot(contexts, [r[0] for r in rows[name]], marker="o", label=name)
            b.plot(contexts, [r[1] / 2**20 for r in rows[name]], marker="o", label=name)
        for ax, title in ((a, "decode tokens/s (batch 1)"), (b, "KV cache, MiB (float32)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        b.set_yscale("log", base=2)
        fig.suptitle("8-layer 512-wide decoder: full attention, a 1024-position sliding window, Infini-attention")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
