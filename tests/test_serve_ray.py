"""``omnifuse serve --ray --replicas 2``: replicas on a local Ray Serve instance answer as one
server does (greedy text and usage equal ``omnifuse generate --json``), each request reaches a
replica, the hardening holds behind Ray's proxy, and SIGTERM stops it all."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from conftest import served

from omnifuse.cli import main

MODEL = "tiny-early"
KEY = "sesame"


def test_replica_options_without_ray_are_refused(capsys):
    assert main(["serve", "--preset", MODEL, "--replicas", "2"]) == 1
    assert "--replicas and --ray-address need --ray" in capsys.readouterr().err


def test_an_unknown_preset_is_said_before_ray_starts(capsys):
    assert main(["serve", "--preset", "no-such-model", "--ray", "--replicas", "2"]) == 1
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ray_replicas_serve_what_one_server_does(tmp_path, capsys):
    pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    args = ["--preset", MODEL, "--ray", "--replicas", "2", "--replica-cpus", "1", "--api-key", KEY, "--max-batch", "2"]
    with served(args, tmp_path / "serve.log", timeout=240) as (url, proc):
        replicas = {httpx.get(url + "/health", timeout=10).json()["replica"] for _ in range(40)}
        assert len(replicas) == 2  # 40 requests all on one of two replicas: 2^-39

        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": "Name three colours."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        assert main(["generate", "--preset", MODEL, "--chat", "--prompt", "Name three colours.",
                     "--max-new-tokens", "12", "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert reply.choices[0].message.content == expected["text"]
        assert reply.usage.prompt_tokens == expected["prompt_tokens"]
        assert reply.usage.completion_tokens == expected["completion_tokens"]
        for _ in range(4):  # whichever replica takes it, streamed or not: the same greedy answer
            stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                    stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["text"]

        denied = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=10,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
