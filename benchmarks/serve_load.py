"""``omnifuse serve`` under load against transformers on the same checkpoint, in one run.

    python benchmarks/serve_load.py [--concurrency 1,8,32] [--requests 4] [--max-tokens 48] [--keep DIR]
                                    [--no-transformers-serve]

Builds a ~130M-parameter LLaVA-style checkpoint (random weights, ``save_pretrained``; the eos
row of its LM head zeroed so that every answer runs its full ``--max-tokens``), then drives, one
after the other so that they never share the CPU:

- ``omnifuse serve`` with 1, 8 and 32 concurrent streaming clients (httpx, reading the SSE
  lines), each sending ``--requests`` chat requests in turn from a fixed mix (half with one
  320x240 image as a data: URI, half text only; greedy);
- transformers' ``generate`` on the same requests one at a time (the same prompt ids and pixels);
- ``transformers serve`` on the same folder with 8 concurrent clients, where it starts here (with
  the text-only half of the mix: transformers 5.24's server answers this LLaVA's image requests
  with a 500, "Image features and image tokens do not match"; omnifuse runs that half too, for the
  ratio).

Prints output tokens/s, time to first token and inter-token latency (p50 / p95) for each, and the
ratios, and the planner's decode prediction for this checkpoint next to the measured one. Targets
(float32, CPU): at 8 concurrent, >= 6x transformers' sequential generate and >= 2x
transformers serve; at 32 concurrent no errors and a throughput no lower than at 8.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Typed content parts, as transformers' processors render them (omnifuse renders these too).
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
                 "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}"
                 "ASSISTANT: {{ m['content'] if m['content'] is string else m['content'][0]['text'] }}</s>{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


# ----------------------------------------------------------------------------- the checkpoint
def build_checkpoint(folder: Path) -> Path:
    """LLaVA-style, ~130M parameters: CLIP 384 x 6 layers at 224 px (196 image tokens), a Llama
    decoder 768 x 12 layers, 32k vocabulary."""
    if (folder / "config.json").exists():
        return folder
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_fixtures import write_word_tokenizer

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                       num_attention_heads=6, image_size=224, patch_size=16, projection_dim=64),
        text_config=LlamaConfig(num_hidden_layers=12, vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5),
        image_token_id=31999, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # eos never wins a greedy choice: every answer is --max-tokens long
        model.lm_head.weight[2].zero_()
    model.save_pretrained(folder)
    write_word_tokenizer(folder, 32000, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 31999},
                         chat_template=CHAT_TEMPLATE)
    # The whole processor (transformers serve needs it): CLIP processing at 224 px, 196 image tokens.
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = "<unk>"
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224,
                                                                                               "width": 224}),
                   tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the request mix
def _png(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (40 * seed % 255, 120, 200))
    ImageDraw.Draw(img).rectangle((20 + 10 * seed, 30, 140, 160), fill=(250, 200 - 20 * seed, 40))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def request_mix(n: int) -> list[dict]:
    """Request k: a short scene question; every other one with one of four images."""
    words = ["red", "blue", "green", "circle", "square", "left", "right", "above", "below", "the", "of", "is"]
    out = []
    for k in range(n):
        text = " ".join(words[(k * 7 + i * 3) % len(words)] for i in range(12 + k % 5)) + " what colour"
        image = _png(k // 2 % 4) if k % 2 == 0 else None
        out.append({"text": text, "image": image})
    return out


def _content(request: dict) -> list[dict]:
    parts = [{"type": "text", "text": request["text"]}]
    if request["image"] is not None:
        uri = "data:image/png;base64," + base64.b64encode(request["image"]).decode()
        parts.insert(0, {"type": "image_url", "image_url": {"url": uri}})
    return parts


# ----------------------------------------------------------------------------- measurement
@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def row(self, name: str) -> dict:
        def pct(xs, q):
            return 1000 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else float("nan")

        return {"name": name, "tok/s": self.tokens / self.seconds if self.seconds else 0.0,
                "ttft p50": pct(self.ttft, 50), "ttft p95": pct(self.ttft, 95),
                "itl p50": pct(self.itl, 50), "itl p95": pct(self.itl, 95), "errors": self.errors,
                "tokens": self.tokens}


async def _client_load(base_url: str, model: str, mix: list[dict], concurrency: int, per_client: int,
                       max_tokens: int) -> Run:
    """``concurrency`` streaming clients, each sending ``per_client`` requests in turn. The clients
    read the SSE lines with httpx and parse only what they count (they share the CPU with the
    server: a heavier client would slow the server it measures)."""
    import httpx

    run = Run()

    async def one(http: httpx.AsyncClient, request):
        body = {"model": model, "messages": [{"role": "user", "content": _content(request)}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        last, count = None, 0
        try:
            async with http.stream("POST", base_url + "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                        if last is None:
                            run.ttft.append(now - start)
                        else:
                            run.itl.append(now - last)
                        last = now
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
        except Exception as e:  # counted and reported; the load goes on
            run.errors += 1
            print(f"    request failed: {type(e).__name__}: {e}", file=sys.stderr)
        run.tokens += count

    async def client_loop(http, c: int):
        for r in range(per_client):
            await one(http, mix[(c * per_client + r) % len(mix)])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http, c) for c in range(concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _serve(cmd: list[str], port: int, model: str, mix, loads: list, per_client: int, max_tokens: int,
           timeout: float = 300) -> tuple[dict, str | None]:
    """``loads``: concurrency levels, or (concurrency, mix) pairs for another mix."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return _drive(proc, log, f"http://127.0.0.1:{port}", cmd, model, mix, loads, per_client, max_tokens, timeout)


def _drive(proc, log, url, cmd, model, mix, loads, per_client, max_tokens, timeout):
    try:
        if not _wait_healthy(url, proc, timeout):
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            return {}, "did not start: " + " | ".join(tail)
        asyncio.run(_client_load(url + "/v1", model, mix, 1, 1, 4))  # warm-up
        runs = {}
        for load in loads:
            c, this_mix = load if isinstance(load, tuple) else (load, mix)
            key = (c, "text") if isinstance(load, tuple) else c
            runs[key] = asyncio.run(_client_load(url + "/v1", model, this_mix, c, per_client, max_tokens))
            print(f"  {cmd[0].split('/')[-1]} {cmd[1]}: {key} concurrent: "
                  f"{runs[key].tokens / runs[key].seconds:.1f} tok/s, {runs[key].errors} errors", flush=True)
        return runs, None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def transformers_sequential(folder: Path, mix: list[dict], max_tokens: int) -> Run:
    """transformers' generate on each request alone, with the same prompt ids and pixels."""
    from transformers import LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    from omnifuse.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(folder)  # prompt ids and pixels exactly as the server makes them
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    run = Run()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    t0 = time.perf_counter()
    for request in mix:
        images = pipe.process_images([request["image"]]) if request["image"] else []
        ids, items = pipe.conversation_and_media([{"role": "user", "content": ("<image>" if images else "")
                                                   + request["text"]}], {"image": images})[:2]
        kwargs = {"pixel_values": items[0].pixel_values} if items else {}
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 streamer=clock, **kwargs)
        times = clock.times[1:]  # the first put() is the prompt
        run.tokens += out.shape[1] - len(ids)
        run.ttft.append(times[0] - start)
        run.itl += [b - a for a, b in itertools.pairwise(times)]
    run.seconds = time.perf_counter() - t0
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=4, help="requests each client sends in turn")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--sequential-requests", type=int, default=8, help="requests transformers' generate runs")
    ap.add_argument("--keep", help="build (or reuse) the checkpoint in this folder")
    ap.add_argument("--no-transformers-serve", action="store_true")
    args = ap.parse_args()
    from omnifuse.planner.resources import machine_line

    print(machine_line(), flush=True)
    loads = [int(c) for c in args.concurrency.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="serve-load-"))
    folder = build_checkpoint(root / "llava-130m")
    mix = request_mix(64)
    text_mix = [r for r in mix if r["image"] is None]
    print(f"checkpoint: {folder} (torch threads {torch.get_num_threads()})", flush=True)

    port = _free_port()
    omni_cmd = [str(Path(sys.executable).parent / "omnifuse"), "serve", "--checkpoint", str(folder), "--port",
                str(port), "--max-batch", str(max(loads)), "--max-queue", "256", "--context", "1024",
                "--served-model-name", "llava-130m", "--log-level", "warning"]
    omni, failure = _serve(omni_cmd, port, "llava-130m", mix, [*loads, (8, text_mix)], args.requests, args.max_tokens)
    if failure:
        sys.exit(f"omnifuse serve {failure}")
    print("  transformers generate, one request at a time ...", flush=True)
    sequential = transformers_sequential(folder, mix[:args.sequential_requests], args.max_tokens)
    hf_serve, hf_failure = {}, "not run (--no-transformers-serve)"
    if not args.no_transformers_serve:
        port = _free_port()
        hf_cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--port", str(port),
                  "--device", "cpu", "--dtype", "float32"]
        hf_serve, hf_failure = _serve(hf_cmd, port, str(folder), mix, [(8, text_mix)], args.requests,
                                      args.max_tokens)

    rows = [omni[c].row(f"omnifuse serve, {c} concurrent") for c in loads]
    rows.append(sequential.row("transformers generate, sequential"))
    rows.append(omni[(8, "text")].row("omnifuse serve, 8, text only"))
    if (8, "text") in hf_serve:
        rows.append(hf_serve[(8, "text")].row("transformers serve, 8, text only"))
    print(f"\n{'':36} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['name']:36} {r['tok/s']:8.1f} {r['ttft p50']:7.0f}ms {r['ttft p95']:7.0f}ms {r['itl p50']:6.0f}ms "
              f"{r['itl p95']:6.0f}ms {r['errors']:6d}")
    base = sequential.tokens / sequential.seconds
    if 8 in omni:
        at8 = omni[8].tokens / omni[8].seconds
        print(f"\nomnifuse serve at 8 concurrent / transformers sequential generate: {at8 / base:.2f}x (target >= 6x)")
        hf8 = hf_serve.get((8, "text"))
        if hf8 is not None and hf8.tokens:
            text8 = omni[(8, "text")]
            print(f"omnifuse serve / transformers serve, 8 concurrent, text only: "
                  f"{(text8.tokens / text8.seconds) / (hf8.tokens / hf8.seconds):.2f}x (target >= 2x)")
        else:
            print(f"transformers serve: {hf_failure or 'no tokens came back'}")
        from omnifuse.planner.plan import Workload, plan, resolve_model
        from omnifuse.planner.resources import local_cpu

        predicted = plan(resolve_model(str(folder)), Workload(images=((320, 240),), text_tokens=25,
                                                              output_tokens=args.max_tokens, concurrency=8),
                         accelerator=local_cpu(), dtype="fp32")["latency"]["decode_tokens_per_s"]
        measured = 8 / (omni[8].row("")["itl p50"] / 1000)
        print(f"decode at batch 8: the planner (omnifuse plan --model DIR --gpu cpu --dtype fp32 --concurrency 8) "
              f"predicts {predicted:.0f} tok/s; measured 8 / ITL p50 = {measured:.0f} tok/s")
        if 32 in omni:
            at32 = omni[32].tokens / omni[32].seconds
            print(f"omnifuse serve at 32 concurrent: {omni[32].errors} errors, {at32 / at8:.2f}x the throughput at 8 "
                  "(target: no errors, >= 1x)")


if __name__ == "__main__":
    main()
