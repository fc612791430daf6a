"""omnifuse against Hugging Face transformers on the same checkpoint folders, in one run.

    python benchmarks/vs_transformers.py [--new-tokens 64] [--agree-steps 128] [--keep DIR]

About 8 minutes on a 2-core CPU, 3 of them building and sharpening the two checkpoints; with
``--keep DIR`` a later run reuses the checkpoints in DIR and takes about 5.

Builds a ~130M-parameter LLaVA-style and a Llama-3.2-Vision-style (Mllama) checkpoint with random
weights, saves each once with ``save_pretrained`` into a temp folder, then measures, each in its
own process (so peak memory is per framework): prefill latency (1 image + 32 text tokens), decode
tokens/s at batch 1 and 8 (greedy, forced to run all steps), peak RSS. omnifuse runs in float32 and
with ``--quantize int8``; transformers in float32. Prints a table with the ratios, the int8
greedy-token agreement with float32 over ``--agree-steps`` steps, and for the cross-attention
model the decode time per token with 1 and with 4 images, then one PASS/FAIL line per target
(``TARGETS``): float32 decode batch 1 >= 1.3x and batch 8 >= 1.5x transformers float32; prefill
>= 1.5x (LLaVA) and >= 1.3x (Mllama); int8 decode batch 1 >= 4x and batch 8 >= 3x, with >= 95%
greedy agreement; cross-attention decode with 4 images within 10% of 1 image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT_TOKENS = 32


# ----------------------------------------------------------------------------- checkpoints
def build_checkpoints(root: Path, train_steps: int) -> dict[str, Path]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MllamaConfig,
        MllamaForConditionalGeneration,
    )
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_fixtures import write_word_tokenizer

    text = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    out = {}
    llava = root / "llava-130m"
    if not (llava / "config.json").exists():
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                           num_attention_heads=6, image_size=224, patch_size=16, projection_dim=64),
            text_config=LlamaConfig(num_hidden_layers=12, **text), image_token_id=31999,
            vision_feature_layer=-2, vision_feature_select_strategy="default")
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg)
        model.save_pretrained(llava)
        write_word_tokenizer(llava, 32000, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 31999})
        if train_steps:
            sharpen(model, llava, train_steps)
            model.save_pretrained(llava)
        (llava / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
            "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "resample": 3}))
    out["llava"] = llava
    mllama = root / "mllama-130m"
    if not (mllama / "config.json").exists():
        vc = MllamaVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_global_layers=2,
                                attention_heads=6, image_size=224, patch_size=14, max_num_tiles=4,
                                intermediate_layers_indices=[1, 3], vision_output_dim=384 * 3)
        tc = MllamaTextConfig(num_hidden_layers=15, cross_attention_layers=[3, 8, 13], pad_token_id=0,
                              **{k: v for k, v in text.items() if k != "max_position_embeddings"})
        torch.manual_seed(0)
        model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vc, text_config=tc, image_token_index=32000))
        with torch.no_grad():  # open the cross-attention gates so images change the text (HF starts them at 0)
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.5)
        model.save_pretrained(mllama)
        write_word_tokenizer(mllama, 32001, {"<unk>": 3, "<|begin_of_text|>": 1, "<|eot_id|>": 2,
                                             "<|finetune_right_pad_id|>": 0, "<|image|>": 32000},
                             bos="<|begin_of_text|>", eos="<|eot_id|>")
        if train_steps:
            sharpen(model, mllama, train_steps)
            model.save_pretrained(mllama)
        (mllama / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "MllamaImageProcessor", "size": {"height": 224, "width": 224},
            "max_image_tiles": 4, "resample": 2}))
    out["mllama"] = mllama
    return out


def _sentences(n: int, seed: int) -> list[str]:
    """Short scene descriptions from a small grammar (the benchmark's prompts come from it too)."""
    import random

    rng = random.Random(seed)
    colours, shapes = ["red", "blue", "green"], ["circle", "square"]
    rels = ["left of", "right of", "above", "below"]
    return [f"the {rng.choice(colours)} {rng.choice(shapes)} is {rng.choice(rels)} the {rng.choice(colours)} "
            f"{rng.choice(shapes)}" for _ in range(n)]


def sharpen(model, folder: Path, steps: int) -> None:
    """A few AdamW steps of next-token training on synthetic text, so the checkpoint's next-token
    distribution is peaked like a trained model's instead of flat (random weights put the top two
    logits within a few percent of each other, where any rounding flips greedy choices)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # fused: a quarter less time per step
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = [tok(" ".join(_sentences(6, step * 4 + i)))["input_ids"] for i in range(4)]
        ids = torch.tensor([r[:min(map(len, rows))] for r in rows])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    print(f"  sharpened {folder.name}: {steps} steps in {time.perf_counter() - t0:.0f} s, final loss {loss.item():.3f}")


def _image(seed: int = 0):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (400, 300), (40 * seed % 255, 120, 200))
    ImageDraw.Draw(img).ellipse((50, 50, 200, 200), fill=(220, 30, 30))
    return img


def _prompt(arch: str, n_images: int) -> str:
    words = " ".join(_sentences(8, 10_000)).split()[:TEXT_TOKENS - 1]
    tag = "<image>" if arch == "llava" else "<|image|>"
    return tag * n_images + " ".join(words)


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- workers
def worker_omnifuse(arch: str, folder: Path, new_tokens: int, quantize: bool, agree_steps: int,
                    reference: list[int] | None) -> dict:
    from omnifuse.inference import SamplingConfig, generate, generate_stream
    from omnifuse.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(folder)
    pipe = (pipe.quantize("int8") if quantize else pipe).pack()  # as `omnifuse generate` runs it
    model = pipe.model
    result = {}
    ids, imgs = _omni_inputs(pipe, arch, 1)

    def prefill():
        cache = model.new_cache(1, len(ids) + 1)
        with torch.inference_mode():
            model(torch.tensor([ids]), images=[imgs], cache=cache, last_only=True)

    prefill()
    result["prefill_ms"] = 1000 * _timed(prefill, 5)

    def run(batch: int, steps: int, n_images: int = 1):
        row_ids, row_imgs = _omni_inputs(pipe, arch, n_images)
        cfg = SamplingConfig(max_new_tokens=steps)  # no stop tokens: every step runs
        for _ in generate_stream(model, [row_ids] * batch, [row_imgs] * batch, cfg):
            pass

    for batch in (1, 8):
        run(batch, 2)
        t_full = _timed(lambda batch=batch: run(batch, new_tokens + 1), 2)
        t_one = _timed(lambda batch=batch: run(batch, 1), 2)
        result[f"decode_b{batch}_tps"] = batch * new_tokens / (t_full - t_one)
    if arch == "mllama":
        for n in (1, 4):
            t_full = _timed(lambda n=n: run(1, new_tokens + 1, n), 2)
            t_one = _timed(lambda n=n: run(1, 1, n), 2)
            result[f"ms_per_token_{n}img"] = 1000 * (t_full - t_one) / new_tokens
    greedy = generate(model, [ids], [imgs], SamplingConfig(max_new_tokens=agree_steps))[0]
    result["greedy_tokens"] = greedy
    if reference is not None:
        # Teacher-forced through the decode path: at each step, does this model pick the float32
        # model's token, given the float32 tokens so far?
        cache = model.new_cache(1, len(ids) + len(reference))
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), images=[imgs], cache=cache, last_only=True)[0, -1]
            agree = 0
            for tok in reference:
                agree += int(logits.argmax()) == tok
                logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)[0, -1]
        result["agreement"] = agree / len(reference)
        result["free_run_prefix"] = next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b),
                                         len(reference))
    return result


def _omni_inputs(pipe, arch, n_images):
    images = pipe.process_images([_image(i) for i in range(n_images)])
    return pipe.prompt_ids(_prompt(arch, n_images), images), images


def worker_transformers(arch: str, folder: Path, new_tokens: int) -> dict:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    result = {}

    def inputs(batch: int, n_images: int = 1) -> dict:
        if arch == "llava":
            from transformers import CLIPImageProcessorPil, LlavaProcessor

            proc = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder), tokenizer=tok,
                                  patch_size=16, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)  # the CLS token CLIP adds
        else:
            from transformers import MllamaImageProcessorPil, MllamaProcessor

            proc = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(folder), tokenizer=tok)
        imgs = [_image(i) for i in range(n_images)]
        return proc(text=[_prompt(arch, n_images)] * batch, images=[imgs] * batch if arch == "mllama" else imgs * batch,
                    return_tensors="pt")

    one = inputs(1)

    def prefill():
        with torch.inference_mode():
            model(**one, use_cache=True, logits_to_keep=1)

    prefill()
    result["prefill_ms"] = 1000 * _timed(prefill, 5)

    def run(batch_inputs, steps):
        with torch.inference_mode():
            model.generate(**batch_inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           pad_token_id=0)

    for batch in (1, 8):
        b = inputs(batch)
        run(b, 2)
        t_full = _timed(lambda b=b: run(b, new_tokens + 1), 2)
        t_one = _timed(lambda b=b: run(b, 1), 2)
        result[f"decode_b{batch}_tps"] = batch * new_tokens / (t_full - t_one)
    return result


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--agree-steps", type=int, default=128)
    ap.add_argument("--keep", help="folder to keep the checkpoints in (default: a temp folder)")
    ap.add_argument("--train-steps", type=int, default=60,
                    help="AdamW steps on synthetic text before saving (0: untrained random weights)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        folder = Path(args.folder)
        if args.worker == "transformers":
            res = worker_transformers(args.arch, folder, args.new_tokens)
        else:
            reference = json.loads(Path(args.reference).read_text()) if args.reference else None
            res = worker_omnifuse(args.arch, folder, args.new_tokens, args.worker == "omnifuse-int8", args.agree_steps,
                                  reference)
        res["peak_mb"] = _peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return

    from rich.console import Console
    from rich.table import Table

    from omnifuse.planner.resources import machine_line

    console = Console(width=140)
    console.print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        console.print(f"building checkpoints in {root} ...")
        folders = build_checkpoints(root, args.train_steps)
        console.print(f"  built in {time.perf_counter() - t_start:.0f} s")
        results: dict[tuple[str, str], dict] = {}
        for arch, folder in folders.items():
            for worker in ("transformers", "omnifuse", "omnifuse-int8"):
                t0 = time.perf_counter()
                console.print(f"measuring {worker} on {arch} ...")
                cmd = [sys.executable, __file__, "--worker", worker, "--arch", arch, "--folder", str(folder),
                       "--new-tokens", str(args.new_tokens), "--agree-steps", str(args.agree_steps)]
                if worker == "omnifuse-int8":  # float32 greedy tokens to agree with
                    ref_file = root / f"{arch}-float32-tokens.json"
                    ref_file.write_text(json.dumps(results[(arch, "omnifuse")]["greedy_tokens"]))
                    cmd += ["--reference", str(ref_file)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    console.print(proc.stdout[-2000:], proc.stderr[-4000:])
                    raise SystemExit(f"{worker} on {arch} failed")
                results[(arch, worker)] = json.loads(line[7:])
                console.print(f"  {time.perf_counter() - t0:.0f} s")

    table = Table(title=f"omnifuse vs transformers {_version('transformers')}, float32 CPU, "
                        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for col in ("model", "framework", "prefill ms", "decode b1 tok/s", "decode b8 tok/s", "peak MB",
                "prefill x", "b1 x", "b8 x"):
        table.add_column(col, justify="left" if col in ("model", "framework") else "right")
    for arch in folders:
        ref = results[(arch, "transformers")]
        for worker in ("transformers", "omnifuse", "omnifuse-int8"):
            r = results[(arch, worker)]
            table.add_row(arch, worker, f"{r['prefill_ms']:.1f}", f"{r['decode_b1_tps']:.1f}", f"{r['decode_b8_tps']:.1f}",
                          f"{r['peak_mb']:.0f}", f"{ref['prefill_ms'] / r['prefill_ms']:.2f}",
                          f"{r['decode_b1_tps'] / ref['decode_b1_tps']:.2f}",
                          f"{r['decode_b8_tps'] / ref['decode_b8_tps']:.2f}")
    console.print(table)
    for arch in folders:
        q = results[(arch, "omnifuse-int8")]
        console.print(f"{arch} int8: greedy agreement with float32 {100 * q['agreement']:.1f}% of {args.agree_steps} "
                      f"teacher-forced steps; free-running tokens identical for the first {q['free_run_prefix']}")
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    m = results.get(("mllama", "omnifuse"))
    if m:
        diff = (m["ms_per_token_4img"] - m["ms_per_token_1img"]) / m["ms_per_token_1img"]
        console.print(f"mllama decode per token: {m['ms_per_token_1img']:.2f} ms with 1 image, "
                      f"{m['ms_per_token_4img']:.2f} ms with 4 images ({100 * diff:+.1f}%)")
    for line in target_lines(results, folders):
        console.print(line)


# (model, framework, measure, at least): a ratio against transformers float32 on the same model
TARGETS = [
    *[(arch, "omnifuse", "decode_b1_tps", 1.3) for arch in ("llava", "mllama")],
    *[(arch, "omnifuse", "decode_b8_tps", 1.5) for arch in ("llava", "mllama")],
    ("llava", "omnifuse", "prefill_ms", 1.5),
    ("mllama", "omnifuse", "prefill_ms", 1.3),
    *[(arch, "omnifuse-int8", "decode_b1_tps", 4.0) for arch in ("llava", "mllama")],
    *[(arch, "omnifuse-int8", "decode_b8_tps", 3.0) for arch in ("llava", "mllama")],
]


def target_lines(results: dict, folders) -> list[str]:
    """One PASS/FAIL line per target this run measured: speed ratios against transformers,
    int8's greedy agreement with float32, and cross-attention decode with 4 images against 1."""
    lines = []
    for arch, worker, key, least in TARGETS:
        if arch not in folders:
            continue
        ours, ref = results[(arch, worker)][key], results[(arch, "transformers")][key]
        ratio = ref / ours if key == "prefill_ms" else ours / ref  # a time: lower is faster
        what = "prefill" if key == "prefill_ms" else f"decode batch {key[8]}"
        lines.append(f"{'PASS' if ratio >= least else 'FAIL'}: {arch} {worker} {what} {ratio:.2f}x transformers "
                     f"float32 (target >= {least}x)")
    for arch in folders:
        agreement = results[(arch, "omnifuse-int8")]["agreement"]
        lines.append(f"{'PASS' if agreement >= 0.95 else 'FAIL'}: {arch} int8 greedy agreement with float32 "
                     f"{100 * agreement:.1f}% (target >= 95%)")
    m = results.get(("mllama", "omnifuse"))
    if m:
        diff = (m["ms_per_token_4img"] - m["ms_per_token_1img"]) / m["ms_per_token_1img"]
        lines.append(f"{'PASS' if diff <= 0.10 else 'FAIL'}: mllama decode with 4 images {100 * diff:+.1f}% against 1 "
                     "image (target within +10%)")
    return lines


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    exec, so a worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
