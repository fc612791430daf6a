"""``omnifuse serve`` through the official ``openai`` client and plain HTTP: text, image, audio and
video parts, streaming and not, usage equal to ``omnifuse generate --json``, and what hostile or
broken requests get (4xx in OpenAI's error format, never a 500)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import scene, served

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from omnifuse.cli import main
from omnifuse.pipeline import Pipeline
from omnifuse.serving.app import ServeSettings, create_app
from omnifuse.serving.media import MediaLimits

MODEL = "tiny-omni-early"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _wav(seconds: float = 1.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.4 * np.sin(2 * np.pi * 440 * t), rate, format="WAV")
    return buffer.getvalue()


def _mp4(path, frames: int = 3) -> bytes:
    from test_video import make_video

    make_video(path, [Fraction(i, 2) for i in range(frames)])  # 2 fps
    return path.read_bytes()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class LiveServer:
    """The app on a free localhost port, in a thread (uvicorn), for real clients."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "scene.png").write_bytes(_png(scene(40, 30, 3)))
    return {"root": root, "png": _png(scene(48, 40, 1)), "wav": _wav(), "mp4": _mp4(root / "clip.mp4")}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset(MODEL)


@pytest.fixture(scope="module")
def server(pipe, media):
    live = LiveServer(create_app(pipe, ServeSettings(model_name=MODEL, max_batch=4, media_root=media["root"])))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _parts(media):
    return [{"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": _data_uri(media["png"], "image/png")}},
            {"type": "text", "text": " and listen "},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(media["wav"]).decode(), "format": "wav"}},
            {"type": "text", "text": " and watch "},
            {"type": "video_url", "video_url": {"url": _data_uri(media["mp4"], "video/mp4")}},
            {"type": "text", "text": " What is it?"}]


def test_a_chat_with_every_modality_matches_generate_json(client, media, tmp_path, capsys):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": _parts(media)}],
                                           max_tokens=8, temperature=0)
    (tmp_path / "a.png").write_bytes(media["png"])
    (tmp_path / "a.wav").write_bytes(media["wav"])
    (tmp_path / "a.mp4").write_bytes(media["mp4"])
    code = main(["generate", "--preset", MODEL, "--chat", "--image", str(tmp_path / "a.png"), "--audio",
                 str(tmp_path / "a.wav"), "--video", str(tmp_path / "a.mp4"), "--prompt",
                 "Look: <image> and listen <audio> and watch <video> What is it?", "--max-new-tokens", "8", "--json"])
    expected = json.loads(capsys.readouterr().out)
    assert code == 0
    assert reply.choices[0].message.content == expected["text"]
    usage = reply.usage
    assert usage.prompt_tokens == expected["prompt_tokens"]
    assert usage.completion_tokens == expected["completion_tokens"] == 8
    details = usage.prompt_tokens_details.model_dump()
    assert details["image_tokens"] == expected["images"][0]["tokens"]
    assert details["audio_tokens"] == expected["audio"][0]["tokens"]
    assert details["video_tokens"] == expected["videos"][0]["tokens"]
    assert reply.choices[0].finish_reason == "length"


def test_streaming_gives_the_same_text_and_usage_at_the_end(client, media):
    messages = [{"role": "user", "content": _parts(media)[:2]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_cache_hits_are_reported_and_change_nothing(client, media, pipe):
    def ask(before: str, after: str):
        content = [{"type": "text", "text": before}, {"type": "image_url", "image_url": {"url": "scene.png"}},
                   {"type": "text", "text": after}]
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0)
        return reply.choices[0].message.content, reply.usage

    first, usage = ask("Here:", "colour?")
    image_tokens = usage.prompt_tokens_details.model_dump()["image_tokens"]
    again, usage = ask("Here:", "colour?")  # the prompt through the image: from the prefix cache
    assert again == first and image_tokens < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    other, usage = ask("There:", "colour?")  # another beginning: the image's encoder output from its cache
    assert usage.prompt_tokens_details.cached_tokens == image_tokens
    cold = LiveServer(create_app(pipe, ServeSettings(model_name=MODEL, media_root=media["root"],
                                                     encoder_cache_bytes=0, prefix_cache_bytes=0)))
    try:  # the same answers with no cache at all
        uncached = openai.OpenAI(base_url=cold.url + "/v1", api_key="x", max_retries=0)
        for before, text in (("Here:", first), ("There:", other)):
            content = [{"type": "text", "text": before}, {"type": "image_url", "image_url": {"url": "scene.png"}},
                       {"type": "text", "text": "colour?"}]
            reply = uncached.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                     max_tokens=6, temperature=0)
            assert reply.choices[0].message.content == text and reply.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        cold.close()


def test_media_are_processed_on_the_engine_thread_only(client, media, pipe, monkeypatch):
    # torch's OpenMP pools are per thread: a second long-lived torch thread slows every decode step
    threads = []
    process = pipe.process

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return process(*args, **kwargs)

    monkeypatch.setattr(pipe, "process", recording)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": _parts(media)}], max_tokens=2)
    assert threads == ["omnifuse-engine"] * 3


def test_completions_n_seed_and_stop(client):
    base = client.completions.create(model=MODEL, prompt="the red square", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[4:6]
    stopped = client.completions.create(model=MODEL, prompt="the red square", max_tokens=12, temperature=0, stop=stop)
    assert stopped.choices[0].text == text[:text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    a = client.completions.create(model=MODEL, prompt="hi", max_tokens=8, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model=MODEL, prompt="hi", max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 16 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_greedy_answers_under_concurrent_load_equal_one_by_one(client, media):
    prompts = [f"{w} circle and {v}" for w, v in zip(["red", "blue", "green", "a", "two", "the"], range(6))]
    images = [None, media["png"], None, media["png"], None, None]

    def ask(i):
        content = [{"type": "text", "text": prompts[i]}]
        if images[i]:
            content.insert(0, {"type": "image_url", "image_url": {"url": _data_uri(images[i], "image/png")}})
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=5 + 3 * i, temperature=0).choices[0].message.content

    alone = [ask(i) for i in range(len(prompts))]
    together: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("omnifuse_requests_total", "omnifuse_prompt_tokens_total", "omnifuse_generation_tokens_total",
                 "omnifuse_queue_depth", "omnifuse_running_batch", "omnifuse_time_to_first_token_seconds_bucket",
                 "omnifuse_time_per_output_token_seconds_bucket", "omnifuse_encoder_cache_hits"):
        assert name in text, name


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert httpx.get(server.url + "/health").json()["running"] == 1
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0


# ------------------------------------------------------------------ hostile and broken requests

def _post(server, body=None, **kwargs):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30, **kwargs)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _chat(content):
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def _image(url):
    return [{"type": "image_url", "image_url": {"url": url}}]


@pytest.mark.parametrize("body, words", [
    ({"model": MODEL}, "messages: Field required"),
    ({"model": MODEL, "messages": []}, "messages: List should have at least 1 item"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    (_chat([{"type": "file", "file": {}}]), "does not match any of the expected tags"),
    ({**_chat("hi"), "temperature": "hot"}, "temperature"),
    ({**_chat("hi"), "presence_penalty": 1.5}, "presence_penalty"),
    ({**_chat("hi"), "tools": []}, "tools: Extra inputs are not permitted"),
    ({**_chat("hi"), "n": 100}, "n: Input should be less than or equal to 8"),
    (_chat([{"type": "text", "text": "x"}] * 300), "at most 256 items"),
    (_chat(_image("data:image/png;base64,@@@not-base64@@@")), "not valid base64"),
    (_chat(_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())), "not a readable image"),
    (_chat(_image("https://example.com/cat.png")), "https URLs are refused: the server fetches nothing"),
    (_chat(_image("gopher://x/y")), "unsupported URL scheme 'gopher'"),
    (_chat(_image("../etc/passwd")), "may not contain '..'"),
    (_chat(_image("/etc/passwd")), "outside the media root"),
    (_chat(_image("missing.png")), "no such file under the media root"),
    (_chat(_image("data:image/png;base64,") ), "not valid base64|is empty"),
    (_chat([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]), "cannot decode audio"),
    (_chat([{"type": "video_url", "video_url": {"url": _data_uri(b"\x00" * 64, "video/mp4")}}]), "video"),
    (_chat("<image> where is the image?"), "1 image placeholder"),
    ({**_chat("hi"), "max_tokens": 5000}, "max_tokens 5000 \\+ the prompt's .* exceed the context of 2048"),
    ({**_chat("hi"), "model": "gpt-4o"}, "model 'gpt-4o' is not served here"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, words):
    response = _post(server, body)
    assert 400 <= response.status_code < 500, response.text
    error = _error(response, response.status_code)
    assert __import__("re").search(words, error["message"]), error["message"]


def test_media_over_the_limits_are_refused_naming_the_limit(pipe, media, tmp_path):
    limits = MediaLimits(max_media=2, max_image_pixels=1000, max_audio_seconds=1.0, max_video_frames=1)
    app = create_app(pipe, ServeSettings(model_name=MODEL, limits=limits))
    live = LiveServer(app)
    try:
        big = _chat(_image(_data_uri(_png(scene(50, 40, 2)), "image/png")))
        assert "more than the 1,000 allowed (--max-image-pixels)" in _error(_post(live, big), 400)["message"]
        many = _chat(_image(_data_uri(_png(scene(20, 20, 2)), "image/png")) * 3)
        assert "more than 2 media parts" in _error(_post(live, many), 400)["message"]
        audio = _chat([{"type": "input_audio", "input_audio": {"data": base64.b64encode(media["wav"]).decode(),
                                                               "format": "wav"}}])
        assert "more than the 1 s allowed (--max-audio-seconds)" in _error(_post(live, audio), 400)["message"]
        video = _chat([{"type": "video_url", "video_url": {"url": _data_uri(media["mp4"], "video/mp4")}}])
        assert "max_frames" in _error(_post(live, video), 400)["message"]
    finally:
        live.close()


def test_a_symlink_out_of_the_media_root_is_refused(server, media, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(media["png"])
    (media["root"] / "link.png").symlink_to(secret)
    error = _error(_post(server, _chat(_image("link.png"))), 400)
    assert "outside the media root" in error["message"]
    assert _post(server, _chat(_image("file://" + str(media["root"] / "scene.png")))).status_code == 200


def test_bodies_too_large_are_413_with_or_without_a_length(pipe):
    live = LiveServer(create_app(pipe, ServeSettings(model_name=MODEL, max_body_bytes=2000)))
    try:
        body = _chat("x" * 5000)
        assert _error(_post(live, body), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            data = json.dumps(body).encode()
            for i in range(0, len(data), 500):
                yield data[i:i + 500]

        response = httpx.post(live.url + "/v1/chat/completions", content=chunks(),
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert _error(response, 413)["code"] == "request_too_large"
        assert _post(live, _chat("hi")).status_code == 200  # and the server is still up
    finally:
        live.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_memory_returns_to_its_baseline_after_bursts_of_big_bodies(tmp_path):
    with served(["--preset", MODEL], tmp_path / "serve.log") as (url, proc):
        junk = base64.b64encode(os.urandom(15 << 20)).decode()
        bodies = [json.dumps(body).encode() for body in (
            _chat(_image("data:image/png;base64," + junk)),  # valid base64, not an image
            _chat(_image("data:image/png;base64," + "@" * (20 << 20))),  # not base64
            _chat([{"type": "text", "text": "x" * 4000}] * 4000))]  # too many parts
        assert httpx.post(url + "/v1/chat/completions", json=_chat("hi"), timeout=30).status_code == 200
        baseline = _rss(proc.pid)

        def post(body):
            return httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                              headers={"Content-Type": "application/json"}).status_code

        for _ in range(3):
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(post, bodies * 3)) == {400}
        deadline = time.time() + 15
        while _rss(proc.pid) > baseline + (48 << 20) and time.time() < deadline:  # a second after the burst
            time.sleep(0.25)
        grown = _rss(proc.pid) - baseline
        assert grown <= 48 << 20, f"{grown >> 20} MiB more than before the bursts"
        assert httpx.post(url + "/v1/chat/completions", json=_chat("hi"), timeout=30).status_code == 200


def test_the_api_key_is_enforced(pipe):
    live = LiveServer(create_app(pipe, ServeSettings(model_name=MODEL, api_key="s3cret")))
    try:
        assert _error(_post(live, _chat("hi")), 401)["code"] == "invalid_api_key"
        assert _post(live, _chat("hi"), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(live, _chat("hi"), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(live.url + "/health").status_code == 200  # the health check needs no key
        keyed = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.models.list().data[0].id == MODEL
    finally:
        live.close()


def test_a_full_queue_answers_429_with_retry_after(pipe):
    live = LiveServer(create_app(pipe, ServeSettings(model_name=MODEL, max_batch=1, max_queue=1)))
    try:
        long = {**_chat("go"), "max_tokens": 1000, "temperature": 0}
        threads = [threading.Thread(target=_post, args=(live, long)) for _ in range(2)]
        threads[0].start()
        deadline = time.time() + 10
        while httpx.get(live.url + "/health").json()["running"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        threads[1].start()
        while httpx.get(live.url + "/health").json()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        response = _post(live, long)
        assert _error(response, 429)["code"] == "queue_full" and response.headers["Retry-After"] == "1"
    finally:
        live.close()  # cancels the two long requests
        for t in threads:
            t.join(timeout=30)


def test_context_overflow_names_what_is_too_long(server):
    too_long = _error(_post(server, _chat("x" * 3000)), 400)
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "messages"
    assert "but the context is 2048" in too_long["message"]
    too_many = _error(_post(server, {**_chat("hi"), "max_tokens": 2040}), 400)
    assert too_many["code"] == "context_length_exceeded" and too_many["param"] == "max_tokens"


def test_malformed_json_is_a_400_in_openai_format(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ',
                          headers={"Content-Type": "application/json"})
    assert "not valid JSON" in _error(response, 400)["message"]


def test_the_default_bind_is_this_machine_only():
    from omnifuse.cli import build_parser

    args = build_parser().parse_args(["serve", "--preset", MODEL])
    assert args.host == "127.0.0.1"


def test_no_request_the_schema_allows_gives_a_500(pipe):
    """Every endpoint of the published OpenAPI schema, fuzzed by schemathesis (a bounded run)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    app = create_app(pipe, ServeSettings(model_name=MODEL, max_batch=2))
    app.state.engine.start()  # the ASGI test transport runs no lifespan
    failures, calls = [], []
    try:
        for result in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            # derandomize: the same examples on every run (CI must not pass or fail by chance)
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)
            def check(case):
                if isinstance(case.body, dict) and "model" in case.body:
                    # The served name, so that requests reach the prompt, media and generation paths;
                    # few tokens, so that a run stays short.
                    case.body["model"] = MODEL
                    if case.body.get("max_tokens") is None:  # without it an answer may run to the context's end
                        case.body["max_tokens"] = 4
                    for key in ("max_tokens", "max_completion_tokens"):
                        if isinstance(case.body.get(key), (int, float)) and case.body[key] > 4:  # 2000.0 is an int too
                            case.body[key] = 4
                response = case.call()
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.text))

            check()
    finally:
        app.state.engine.stop()
    assert not failures
    assert len(calls) > 60 and any(400 <= c < 500 for c in calls) and calls.count(200) > 10


def test_a_hugging_face_llava_folder_serves_what_generate_gives(tmp_path, capsys):
    from hf_fixtures import save_llava

    folder = save_llava(tmp_path / "llava", seed=3)
    image = scene(50, 40, 4)
    image.save(tmp_path / "a.png")
    live = LiveServer(create_app(Pipeline.from_checkpoint(folder), ServeSettings(model_name="llava")))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": _data_uri(_png(image), "image/png")}},
                   {"type": "text", "text": "what is the colour of the circle"}]
        reply = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                               max_tokens=12, temperature=0)
    finally:
        live.close()
    code = main(["generate", "--checkpoint", str(folder), "--chat", "--image", str(tmp_path / "a.png"), "--prompt",
                 "<image>what is the colour of the circle", "--max-new-tokens", "12", "--json"])
    expected = json.loads(capsys.readouterr().out)
    assert code == 0
    assert reply.choices[0].message.content == expected["text"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected["prompt_tokens"],
                                                                          expected["completion_tokens"])
    assert reply.usage.prompt_tokens_details.model_dump()["image_tokens"] == expected["visual_tokens"]


def test_a_cross_attention_model_reports_its_cross_attention_states(media, tmp_path, capsys):
    from fastapi.testclient import TestClient

    app = create_app(Pipeline.from_preset("tiny-cross"), ServeSettings(model_name="tiny-cross"))
    with TestClient(app) as http:
        reply = http.post("/v1/chat/completions", json={
            "model": "tiny-cross", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_uri(media["png"], "image/png")}},
                {"type": "text", "text": "colour?"}]}]}).json()
    (tmp_path / "a.png").write_bytes(media["png"])
    assert main(["generate", "--preset", "tiny-cross", "--chat", "--image", str(tmp_path / "a.png"), "--prompt",
                 "<image>colour?", "--max-new-tokens", "6", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    details = reply["usage"]["prompt_tokens_details"]
    assert reply["usage"]["prompt_tokens"] == expected["prompt_tokens"]
    assert details["cross_attention_states"] == expected["cross_attention_states_prefill"] > 0
    assert reply["choices"][0]["message"]["content"] == expected["text"]


def test_the_media_limit_counts_every_message_of_the_conversation_once(pipe, media):
    from fastapi.testclient import TestClient

    app = create_app(pipe, ServeSettings(model_name=MODEL, limits=MediaLimits(max_media=2)))
    part = _image(_data_uri(media["png"], "image/png"))
    messages = [{"role": "user", "content": part}, {"role": "assistant", "content": "a picture"},
                {"role": "user", "content": part + [{"type": "text", "text": "and this one?"}]}]
    with TestClient(app) as http:
        two = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": messages})
        three = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": messages + [
            {"role": "user", "content": part}]})
    assert two.status_code == 200, two.text
    assert two.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 2 * 64
    assert "more than 2 media parts" in _error(three, 400)["message"]
