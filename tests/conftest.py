"""Shared tiny configurations; everything is generated, nothing is downloaded."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw

from omnifuse.config import ConnectorConfig, DecoderConfig, FusionConfig, ImageConfig, ModelConfig, VisionConfig

PLACEHOLDER = 259  # ByteTokenizer's <image>


def tiny_config(fusion: str = "early", *, mode: str = "fixed", num_kv_heads: int = 2, feature_select: str = "default",
                cross_layers: tuple[int, ...] = (0, 2), init_std: float = 0.08, **image_kwargs) -> ModelConfig:
    """A few-hundred-thousand-parameter model; larger init std keeps greedy argmax away from ties."""
    return ModelConfig(
        name=f"test-{fusion}-{mode}",
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, feature_layer=-1, feature_select=feature_select),
        image=ImageConfig(mode=mode, image_size=32, **image_kwargs),
        connector=ConnectorConfig(type="mlp"),
        fusion=FusionConfig(type=fusion, cross_attention_layers=cross_layers if fusion == "cross" else ()),
        decoder=DecoderConfig(vocab_size=260, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=num_kv_heads,
                              intermediate_size=128, max_position=512),
        init_std=init_std,
    )


def make_model(config: ModelConfig, seed: int = 0, gates: float | None = None):
    from omnifuse.model import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    if gates is not None:
        with torch.no_grad():
            for layer in model.cross_layers.values():
                layer.attn_gate.gate.fill_(gates)
                layer.mlp_gate.gate.fill_(gates)
    return model


def scene(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A small random scene of coloured shapes."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (width, height), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in torch.randint(0, max(1, width // 2), (2,), generator=g))
        color = tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g))
        draw.rectangle((x0, y0, x0 + width // 3, y0 + height // 3), fill=color)
    return img


@pytest.fixture
def replace():
    return dataclasses.replace


@contextlib.contextmanager
def served(args: list[str], log_path, timeout: float = 120):
    """``omnifuse serve ARGS --port P`` in its own process, yielded as (url, process) once /health
    answers; terminated (and waited for) on exit if it still runs."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "omnifuse", "serve", *args, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while True:
                assert proc.poll() is None, Path(log_path).read_text()[-3000:]
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, f"omnifuse serve did not answer /health in {timeout:g} s"
                time.sleep(0.5)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
