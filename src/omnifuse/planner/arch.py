"""Architectures as numbers: what the planner needs to count parameters, FLOPs and cache bytes.

omnifuse presets are translated from their ``ModelConfig`` (``from_model_config``), so the planner
reads the same config the model is built from. Published models that omnifuse cannot build yet
(MoE, pixel shuffle, Q-Former, sliding windows) are described in ``PUBLISHED`` from their
reference configs, each entry naming its source.

FLOP convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses): 2 FLOPs per
multiply-accumulate of every matmul and convolution, attention as two batched matmuls over the
full query x key rectangle (4 * q * k * head_dim per head, causal masking not discounted);
norms, activations, softmax and RoPE are not counted. Prefill computes logits for the last
position only, as generation needs.

Cross-attention states come in two counts (``MediaWork``): prefill computes K/V of, and attends
over, every state the encoder produced (Llama 3.2 Vision: padding tiles too, masked); decode
attends to, and the decode cache keeps, only the states the last prompt token attends to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omnifuse.config import ModelConfig
from omnifuse.errors import PlanError

__all__ = ["Architecture", "CacheBytes", "ConnectorArch", "DecoderArch", "EncoderArch", "MediaWork",
           "cache_bytes", "from_model_config"]


@dataclass(frozen=True)
class EncoderArch:
    """A ViT-style encoder. ``stem``: the convolutions before the first layer, as (in, out, kernel,
    stride); empty means one ``patch x patch`` projection."""

    hidden: int
    layers: int  # layers actually run (up to the feature layer)
    heads: int
    intermediate: int
    patch: int
    image_size: int  # crop side in pixels
    mlp_matrices: int = 2  # 2: GELU MLP; 3: SwiGLU
    cls_tokens: int = 1
    pad_to: int = 1  # sequence padded to a multiple of this (Mllama: 8)
    stem: tuple[tuple[int, int, int, int], ...] = ()
    global_layers: int = 0  # a second stack over the same sequence (Mllama's gated global layers)
    joint_crops: bool = False  # all crops of an image attend to each other (Mllama tiles)
    dynamic: bool = False  # native resolution: patches per crop follow the image (Qwen2-VL)
    channels: int = 3
    merge_tokens: int = 0  # ToMe: tokens each layer merges (encoders/tome.py)

    @property
    def patches_per_crop(self) -> int:
        return (self.image_size // self.patch) ** 2

    def convs(self) -> tuple[tuple[int, int, int, int], ...]:
        return self.stem or ((self.channels, self.hidden, self.patch, self.patch),)

    def parameters(self) -> int:
        h, i = self.hidden, self.intermediate
        stem = sum(ci * co * k * k + co for ci, co, k, _ in self.convs())
        layer = 4 * h * h + 4 * h + self.mlp_matrices * h * i + (self.mlp_matrices - 1) * i + h + 4 * h
        positions = (self.patches_per_crop + self.cls_tokens) * h
        return stem + positions + self.cls_tokens * h + (self.layers + self.global_layers) * layer

    def flops(self, crops: int, patches_per_crop: int | None = None) -> int:
        """One image of ``crops`` crops (``patches_per_crop`` overrides the crop size)."""
        n_patch = patches_per_crop if patches_per_crop is not None else self.patches_per_crop
        side = math.isqrt(n_patch * self.patch * self.patch) if patches_per_crop is not None else self.image_size
        stem, hw = 0, side * side  # convolutions, crop by crop
        for ci, co, k, s in self.convs():
            hw //= s * s
            stem += 2 * ci * k * k * co * hw
        if patches_per_crop is not None:  # non-square dynamic crops: the projection is per patch
            stem = stem * n_patch // max(1, (side // self.patch) ** 2)
        n = n_patch + self.cls_tokens
        n = -(-n // self.pad_to) * self.pad_to
        h = self.hidden
        if self.merge_tokens:
            return crops * (stem + self._merging_layer_flops(n))
        dense = crops * n * (2 * 4 * h * h + 2 * self.mlp_matrices * h * self.intermediate)
        attention = 4 * h * ((crops * n) ** 2 if self.joint_crops else crops * n * n)
        return crops * stem + (self.layers + self.global_layers) * (dense + attention)

    def _merging_layer_flops(self, n: int) -> int:
        """One crop's layers with token merging: attention over the tokens a layer gets, the
        key similarity of its two halves, the MLP over the tokens left after merging."""
        from omnifuse.encoders.tome import merge_count

        h, flops = self.hidden, 0
        for _ in range(self.layers):
            r = merge_count(n, self.merge_tokens, self.cls_tokens)
            flops += n * 2 * 4 * h * h + 4 * h * n * n
            if r:
                flops += 2 * ((n + 1) // 2) * (n // 2) * (h // self.heads)
            n -= r
            flops += n * 2 * self.mlp_matrices * h * self.intermediate
        return flops


@dataclass(frozen=True)
class ConnectorArch:
    """Encoder features -> decoder width. ``merge``: encoder positions folded into one token
    (pixel shuffle / patch merge: scale_factor squared; average pooling: the pool area).

    ``kind``: ``linear`` / ``mlp`` (on merged positions), ``pool_linear`` (average pool, then a
    linear), ``qformer`` (``queries`` learned queries, ``layers`` BERT layers of width ``hidden``,
    cross-attention every ``cross_every``-th from the first), ``perceiver`` (``queries`` latents,
    ``layers`` layers of width ``hidden``, attention ``attention`` wide (0: hidden; IDEFICS's
    heads x head_dim), feed-forward biases ``bias``, no projection to the decoder when not
    ``project``). ``intermediate``: their feed-forward width (0: 4 x hidden). ``mlp_out``: a second
    out x out layer after the projection (omnifuse's mlp projection of pixel shuffle and pooling)."""

    kind: str  # linear | mlp | pool_linear | qformer | perceiver
    in_dim: int  # encoder channels per position (before merging)
    out_dim: int
    hidden: int = 0  # mlp: width of the first layer (0: out_dim)
    merge: int = 1
    bias: bool = True
    queries: int = 0
    layers: int = 0
    cross_every: int = 2
    intermediate: int = 0
    mlp_out: bool = False
    adapter: int = 0  # Llama 4: two layers of this width (d_in -> a, a -> a) before the projection a -> out
    attention: int = 0
    project: bool = True

    @property
    def _cross_layers(self) -> int:
        return len(range(0, self.layers, self.cross_every))

    def parameters(self) -> int:
        d_in = self.in_dim * (1 if self.kind == "pool_linear" else self.merge)
        if self.kind == "mlp":
            mid = self.hidden or self.out_dim
            return d_in * mid + mid * self.out_dim + (mid + self.out_dim) * self.bias
        if self.kind == "qformer":
            q, i = self.hidden, self.intermediate or 4 * self.hidden
            layer = 4 * q * q + 2 * q * i  # self-attention + MLP
            cross = 2 * q * q + 2 * self.in_dim * q  # q, o from the queries; k, v from the image
            return self.queries * q + self.layers * layer + self._cross_layers * cross + q * self.out_dim
        if self.kind == "perceiver":
            h, i, a = self.hidden, self.intermediate or 4 * self.hidden, self.attention or self.hidden
            proj_in = (self.in_dim + 1) * h if self.in_dim != h else 0
            layer = 3 * 2 * h + 4 * h * a + 2 * h * i + (i + h) * self.bias  # 3 norms, attention, MLP
            proj = (h + 1) * self.out_dim if self.project else 0
            return self.queries * h + proj_in + self.layers * layer + 2 * h + proj
        if self.adapter:
            a = self.adapter
            return d_in * a + a * a + a * self.out_dim + (2 * a + self.out_dim) * self.bias
        extra = self.out_dim * self.out_dim if self.mlp_out else 0
        return d_in * self.out_dim + extra + self.out_dim * self.bias

    def flops(self, encoder_positions: int, crops: int = 1) -> int:
        """For an image whose encoder produced ``encoder_positions`` feature vectors over
        ``crops`` crops (the Q-Former and perceiver run per crop)."""
        tokens = encoder_positions // self.merge
        d_in = self.in_dim * (1 if self.kind == "pool_linear" else self.merge)
        if self.kind == "mlp":
            mid = self.hidden or self.out_dim
            return 2 * tokens * (d_in * mid + mid * self.out_dim)
        e = encoder_positions // max(1, crops)  # features of one crop
        if self.kind == "qformer":
            q, m, i = self.hidden, self.queries, self.intermediate or 4 * self.hidden
            self_part = self.layers * (2 * m * 4 * q * q + 4 * m * m * q + 2 * m * 2 * q * i)
            cross = self._cross_layers * (2 * m * 2 * q * q + 2 * e * 2 * self.in_dim * q + 4 * m * e * q)
            return crops * (self_part + cross + 2 * m * q * self.out_dim)
        if self.kind == "perceiver":
            h, m, i, a = self.hidden, self.queries, self.intermediate or 4 * self.hidden, self.attention or self.hidden
            proj_in = 2 * e * self.in_dim * h if self.in_dim != h else 0
            layer = 2 * m * 2 * h * a + 2 * (e + m) * 2 * h * a + 4 * m * (e + m) * a + 2 * m * 2 * h * i
            proj = 2 * m * h * self.out_dim if self.project else 0
            return crops * (proj_in + self.layers * layer + proj)
        if self.kind == "pool_linear" and self.queries:  # pooled to a fixed count per crop
            tokens = crops * self.queries
        if self.adapter:
            a = self.adapter
            return 2 * tokens * (d_in * a + a * a + a * self.out_dim)
        return 2 * tokens * (d_in * self.out_dim + (self.out_dim * self.out_dim if self.mlp_out else 0))


@dataclass(frozen=True)
class DecoderArch:
    hidden: int
    layers: int  # self-attention layers
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    vocab: int
    tied: bool = False
    mlp_matrices: int = 3  # 3: SwiGLU; 2: ReLU/GELU MLP (OPT)
    qkv_bias: bool = False
    extra_embeddings: int = 0
    # Mixture of experts (Llama 4): every ``moe_every``-th layer routes each token to
    # ``experts_per_token`` of ``experts`` plus ``shared_experts`` always-on ones.
    experts: int = 0
    experts_per_token: int = 1
    shared_experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert's width (0: expert_intermediate)
    moe_every: int = 1
    # Attention span: ``window`` > 0 limits all but every ``global_every``-th layer to the last
    # ``window`` positions (Gemma 3 sliding window), or, with ``chunked``, to the query's
    # ``window``-sized block (Llama 4 chunked attention).
    window: int = 0
    global_every: int = 0
    chunked: bool = False
    # Per layer, when the layers differ otherwise than the rules above say (an omnifuse config's
    # layer specs): each layer's (attention kind, span) and whether its feed-forward is MoE.
    layer_attention: tuple[tuple[str, int], ...] = ()
    layer_moe: tuple[bool, ...] = ()
    memory_rule: str = "delta"  # Infini-attention layers' update: delta (one more retrieval) or linear
    # Gated cross-attention layers (Llama 3.2 Vision), each with its own MLP of ``intermediate``,
    # keys and values projected from media states ``cross_kv_dim`` wide (0: hidden; IDEFICS: the
    # perceiver's width), q/k RMSNorm when ``cross_qk_norm``.
    cross_layers: int = 0
    cross_kv_dim: int = 0
    cross_qk_norm: bool = True

    def __post_init__(self) -> None:
        if self.layer_attention and len(self.layer_attention) != self.layers:
            raise ValueError(f"layer_attention describes {len(self.layer_attention)} layers, not {self.layers}")
        if self.layer_moe and len(self.layer_moe) != self.layers:
            raise ValueError(f"layer_moe describes {len(self.layer_moe)} layers, not {self.layers}")

    @property
    def moe_layers(self) -> int:
        if self.layer_moe:
            return sum(self.layer_moe)
        return self.layers // self.moe_every if self.experts else 0

    def attention_kinds(self) -> tuple[tuple[str, int], ...]:
        """Each layer's (kind, span): ("full", 0), ("sliding", window) or ("chunked", chunk)."""
        if self.layer_attention:
            return self.layer_attention
        bounded = ("chunked" if self.chunked else "sliding", self.window)
        every = self.global_every
        return tuple(("full", 0) if not self.window or (every and (i + 1) % every == 0) else bounded
                     for i in range(self.layers))

    @property
    def windowed_layers(self) -> int:
        return sum(kind != "full" for kind, _ in self.attention_kinds())

    @property
    def full_layers(self) -> int:
        return self.layers - self.windowed_layers

    def _attention_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias

    def _mlp_params(self, width: int) -> int:
        return self.mlp_matrices * self.hidden * width

    def parameters(self) -> int:
        h = self.hidden
        moe = self.moe_layers
        mlps = (self.layers - moe) * self._mlp_params(self.intermediate) + moe * (
            self.experts * self._mlp_params(self.expert_intermediate) + self._shared_params() + h * self.experts)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        cross_attention = 2 * h * q + 2 * (self.cross_kv_dim or h) * kv  # q, o; k, v from the media
        cross = self.cross_layers * (cross_attention + self._mlp_params(self.intermediate) + 2 * h
                                     + 2 * self.head_dim * self.cross_qk_norm + 2)  # + norms, q/k norms, the two gates
        body = self.layers * (self._attention_params() + 2 * h) + mlps + cross + h
        return body + (self.vocab + self.extra_embeddings) * h + (0 if self.tied else self.vocab * h)

    def _shared_params(self) -> int:
        return self.shared_experts * self._mlp_params(self.shared_intermediate or self.expert_intermediate)

    def inactive_parameters(self) -> int:
        """Routed-expert weights a token does not use."""
        return self.moe_layers * (self.experts - self.experts_per_token) * self._mlp_params(self.expert_intermediate)

    def token_matmul_flops(self) -> int:
        """2 x the multiply-adds one token spends in the layers' linear maps (no attention, no head)."""
        h = self.hidden
        expert = self._mlp_params(self.expert_intermediate)
        moe = self.moe_layers
        per = self.layers * (self._attention_params() - (self.heads + 2 * self.kv_heads) * self.head_dim * self.qkv_bias)
        per += (self.layers - moe) * self._mlp_params(self.intermediate)
        per += moe * (self.experts_per_token * expert + self._shared_params() + h * self.experts)
        return 2 * per

    def memory_flops(self, positions: int) -> int:
        """Infini-attention's memory work for a forward of ``positions`` tokens from position 0:
        per head, a retrieval and an update (delta: and the update's own retrieval), each
        Dh x Dh per cell. ``InfiniAttention`` lays a chunk out as the segments it touches, each
        ``min(segment, positions)`` cells wide (decoding: one cell)."""
        matmuls = 3 if self.memory_rule == "delta" else 2
        flops = 0
        for kind, segment in self.attention_kinds():
            if kind == "infini":
                cells = -(-positions // segment) * min(segment, positions)
                flops += 2 * matmuls * self.heads * self.head_dim * self.head_dim * cells
        return flops

    def attention_span(self, position: int) -> int:
        """Keys summed over layers that a query at ``position`` (1-based context length) is
        computed against: a bounded layer's ring of its span (a chunked layer's masks what is
        outside the query's block; masking is not discounted)."""
        return sum(position if kind == "full" else min(position, span) for kind, span in self.attention_kinds())

    def prefill_span(self, positions: int) -> int:
        """Keys summed over every query of a ``positions``-token prefill and every layer: the
        attention rectangles the prefill computes. A full layer's is positions x positions; a
        bounded layer of span R (``LocalAttention``) runs its queries in blocks of R, each over
        its own and the previous block's keys."""
        total = 0
        for kind, span in self.attention_kinds():
            if kind == "full" or positions <= span:
                total += positions * positions
                continue
            total += span * span  # the first block
            for start in range(span, positions, span):
                q = min(span, positions - start)
                total += q * (q + span)
        return total

    def kv_bytes(self, positions: int, dtype_bytes: float) -> float:
        """Self-attention cache for ``positions`` context tokens: a bounded layer keeps a ring of
        its span (``RingKVCache``), at most the context."""
        per_slot = self.slot_bytes(dtype_bytes)
        return sum(per_slot * (positions if kind == "full" else min(positions, span))
                   + self.memory_bytes * (kind == "infini") for kind, span in self.attention_kinds())

    def slot_bytes(self, dtype_bytes: float) -> float:
        """K and V of one cache slot in one layer."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    @property
    def memory_bytes(self) -> int:
        """An Infini-attention layer's memory state: float32 M, z and their pending update."""
        return 4 * self.heads * (2 * self.head_dim * self.head_dim + 2 * self.head_dim)

    def cross_kv_bytes(self, states: int, dtype_bytes: float) -> float:
        """Cross-attention cache for ``states`` media states (K/V in every cross-attention layer)."""
        return 2 * self.cross_layers * self.kv_heads * self.head_dim * dtype_bytes * states


@dataclass(frozen=True)
class CacheBytes:
    """Cache bytes of one request, by kind."""

    self_attention: int  # K/V of every context position, prompt and output
    cross_attention_prefill: int  # K/V of every state encoded at prefill (padding tiles included)
    cross_attention_decode: int  # K/V the decode cache keeps: the states attended at decode

    @property
    def decode(self) -> int:
        """The cache a request holds while it decodes (what ``InferenceCache.nbytes`` allocates)."""
        return self.self_attention + self.cross_attention_decode

    def as_dict(self) -> dict[str, int]:
        return {"self_attention": self.self_attention, "cross_attention_prefill": self.cross_attention_prefill,
                "cross_attention_decode": self.cross_attention_decode}


def cache_bytes(decoder: DecoderArch, positions: int, cross_states_prefill: int, cross_states_decode: int,
                dtype_bytes: float) -> CacheBytes:
    """The one cache formula (``plan``, ``info``, the pipeline, the arena): ``positions`` context
    tokens of self-attention K/V, and the cross-attention K/V of each state count."""
    return CacheBytes(int(decoder.kv_bytes(positions, dtype_bytes)),
                      int(decoder.cross_kv_bytes(cross_states_prefill, dtype_bytes)),
                      int(decoder.cross_kv_bytes(cross_states_decode, dtype_bytes)))


@dataclass(frozen=True)
class MediaWork:
    """What one media item costs the model: encoder crops (and patches per crop when dynamic),
    tokens placed in the context, and cross-attention states encoded at prefill and attended at
    decode."""

    crops: int  # crops the encoder runs, padding tiles included
    context_tokens: int
    cross_states_prefill: int = 0
    cross_states_decode: int = 0
    patches_per_crop: int | None = None
    encoder_positions: int = 0  # feature vectors the encoder hands the connector (0: crops x patches)
    flops: int | None = None  # encoder + connector FLOPs when worked out already (omnifuse audio, video)


@dataclass(frozen=True)
class Architecture:
    name: str
    decoder: DecoderArch
    encoder: EncoderArch | None = None
    connector: ConnectorArch | None = None
    source: str = ""
    estimated: bool = False  # an assumed architecture (closed models): every figure is an estimate
    notes: tuple[str, ...] = ()

    def parameters(self) -> dict[str, int]:
        enc = self.encoder.parameters() if self.encoder else 0
        con = self.connector.parameters() if self.connector else 0
        dec = self.decoder.parameters()
        total = enc + con + dec
        return {"total": total, "active": total - self.decoder.inactive_parameters(),
                "vision_encoder": enc, "connector": con, "decoder": dec}

    def encoder_flops(self, media: MediaWork) -> int:
        if media.flops is not None:
            return media.flops
        if self.encoder is None:
            return 0
        flops = self.encoder.flops(media.crops, media.patches_per_crop)
        if self.connector is not None:
            positions = media.encoder_positions or media.crops * (media.patches_per_crop or self.encoder.patches_per_crop)
            flops += self.connector.flops(positions, max(1, media.crops))
        return flops

    def prefill_flops(self, context_tokens: int, media: list[MediaWork]) -> dict[str, int]:
        """FLOPs of one request's prefill: encoder + connector per media item, the decoder over the
        whole context, cross-attention over all media states, logits for the last position."""
        d = self.decoder
        s = context_tokens
        states = sum(m.cross_states_prefill for m in media)  # K/V and attention over every encoded state
        encoder = sum(self.encoder_flops(m) for m in media)
        span = d.prefill_span(s)  # every query against the key range it computes
        decoder = s * d.token_matmul_flops() + 4 * d.heads * d.head_dim * span + d.memory_flops(s)
        cross = 0
        if d.cross_layers and states:
            q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
            cross = d.cross_layers * (2 * states * (d.cross_kv_dim or d.hidden) * 2 * kv + 2 * s * (2 * d.hidden * q)
                                      + 2 * s * d.mlp_matrices * d.hidden * d.intermediate + 4 * s * states * q)
        head = 2 * d.hidden * d.vocab
        return {"encoder": encoder, "decoder": decoder, "cross_attention": cross, "lm_head": head,
                "total": encoder + decoder + cross + head}

    def decode_flops(self, position: int, cross_states_decode: int = 0) -> int:
        """FLOPs of one generated token whose context (itself included) is ``position`` long and
        whose cross-attention reads ``cross_states_decode`` states."""
        d = self.decoder
        flops = (d.token_matmul_flops() + 4 * d.heads * d.head_dim * d.attention_span(position) + d.memory_flops(1)
                 + 2 * d.hidden * d.vocab)
        if d.cross_layers and cross_states_decode:
            q = d.heads * d.head_dim
            flops += d.cross_layers * (2 * 2 * d.hidden * q + 2 * d.mlp_matrices * d.hidden * d.intermediate
                                       + 4 * cross_states_decode * q)
        return flops


def connector_arch(config: ModelConfig) -> ConnectorArch:
    """The planner's view of an omnifuse connector (``connectors/``)."""
    c, v, d = config.connector, config.vision, config.decoder
    common = dict(in_dim=v.feature_dim, out_dim=d.hidden_size, bias=c.bias)
    if c.type in ("qformer", "perceiver"):
        return ConnectorArch(kind=c.type, **common, hidden=c.hidden_size or v.feature_dim, queries=c.output_tokens,
                             layers=c.num_layers, cross_every=c.cross_attention_every,
                             intermediate=c.intermediate_size, attention=c.num_heads * c.head_dim,
                             project=c.projection != "none")
    if c.type == "pixel_shuffle":
        return ConnectorArch(kind="linear", **common, merge=c.scale_factor ** 2, mlp_out=c.projection == "mlp",
                             adapter=(c.hidden_size or d.hidden_size) if c.projection == "llama4" else 0)
    if c.type == "pool":
        side = config.image.image_size // v.patch_size
        return ConnectorArch(kind="pool_linear", **common, merge=max(1, side * side // c.output_tokens),
                             queries=c.output_tokens, mlp_out=c.projection == "mlp")
    return ConnectorArch(kind=c.type, **common)


def from_model_config(config: ModelConfig) -> Architecture:
    """The planner's view of an omnifuse model config (presets, arena models, checkpoints), from
    the same per-layer specs the decoder builder reads (``ModelConfig.layer_specs``)."""
    v, d = config.vision, config.decoder
    specs = config.layer_specs
    spans = {"full": 0, "sliding": d.sliding_window, "chunked": d.attention_chunk_size, "infini": d.memory_segment}
    for i, spec in enumerate(specs):
        if spec.attention not in spans or spec.feed_forward not in ("dense", "moe"):
            raise PlanError(f"decoder layer {i} ({spec.attention} attention, {spec.feed_forward} feed-forward) "
                            "has no cost formula in planner/arch.py yet")
    moe = tuple(s.feed_forward == "moe" for s in specs)
    decoder = DecoderArch(hidden=d.hidden_size, layers=len(specs), heads=d.num_heads, kv_heads=d.num_kv_heads,
                          head_dim=d.head_dim, intermediate=d.intermediate_size, vocab=d.vocab_size,
                          layer_attention=tuple((s.attention, spans[s.attention]) for s in specs),
                          layer_moe=moe if any(moe) else (), memory_rule=d.memory_rule, experts=d.num_experts if any(moe) else 0,
                          experts_per_token=d.experts_per_token, shared_experts=int(d.shared_expert_intermediate_size > 0),
                          expert_intermediate=d.expert_intermediate_size or d.intermediate_size,
                          shared_intermediate=d.shared_expert_intermediate_size,
                          tied=d.tie_embeddings, qkv_bias=d.attention_bias or d.qkv_bias, extra_embeddings=d.extra_embeddings,
                          cross_layers=sum(s.cross_attention for s in specs) + int(config.final_cross_attention),
                          cross_kv_dim=config.media_width, cross_qk_norm=config.fusion.cross_attention_qk_norm)
    if v is None:  # a text-only model
        return Architecture(name=config.name, decoder=decoder, source=f"omnifuse config {config.name}")
    if v.type == "mllama":
        encoder = EncoderArch(hidden=v.hidden_size, layers=v.num_layers, heads=v.num_heads,
                              intermediate=v.intermediate_size, patch=v.patch_size, image_size=v.image_size,
                              global_layers=v.num_global_layers, pad_to=8, joint_crops=True)
    else:
        layers = max(i % (v.num_layers + 1) for i in v.feature_layers)
        stem: tuple[tuple[int, int, int, int], ...] = ()
        if v.stem == "conv":
            from omnifuse.encoders.vit import conv_stem_layers

            stem = tuple(conv_stem_layers(v.num_channels, v.hidden_size, v.patch_size))
        encoder = EncoderArch(hidden=v.hidden_size, layers=layers, heads=v.num_heads, intermediate=v.intermediate_size,
                              patch=v.patch_size, image_size=v.image_size, cls_tokens=int(v.use_cls), stem=stem,
                              channels=v.num_channels, merge_tokens=v.merge_tokens)
    connector = connector_arch(config)
    return Architecture(name=config.name, decoder=decoder, encoder=encoder, connector=connector,
                        source=f"omnifuse config {config.name}")
