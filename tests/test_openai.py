"""The OpenAI-compatible API: the official `openai` client against a real server, field mapping,
streaming, and every bad input answered 4xx in OpenAI's error shape.

Fast tests use test_serve's stand-in captioner behind a TestClient; the slow ones start
`captioner serve` on the tiny chatty GIT and talk to it with `openai.OpenAI`.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_serve import FakeCaptioner, _free_port, noise_png, png  # noqa: E402

from captioner.data import fetch  # noqa: E402
from captioner.decoding import DecodingOptions, Generated  # noqa: E402
from captioner.engine import Captioner  # noqa: E402
from captioner.serve import create_app  # noqa: E402
from captioner.serve.openai import token_pieces  # noqa: E402

KEY = "s3cret"


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts: dict, model: str = "fake", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": list(parts)}], **fields}


def client_for(captioner=None, **limits) -> TestClient:
    return TestClient(create_app(captioner or FakeCaptioner(), model_name="fake", **limits))


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# ---- answers ----


def test_chat_completion_answers_in_openai_shape():
    with client_for() as client:
        r = client.post("/v1/chat/completions", json=chat(image_part(data_url(png(16, 12)))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "16x12 rgb(200, 40, 40)",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_fields_map_onto_decoding_options():
    fake = FakeCaptioner()
    image = image_part(data_url(png()))
    text = {"type": "text", "text": " a photo  of "}
    with client_for(fake) as client:
        for fields in (
            {},
            {"max_tokens": 7, "temperature": 0},
            {"temperature": 0.7, "top_p": 0.9, "n": 2},
            {"n": 3},
            {"max_completion_tokens": 5, "top_p": 0.5},
        ):
            r = client.post("/v1/chat/completions", json=chat(text, image, **fields))
            assert r.status_code == 200, (fields, r.text)
    decodings = [d for _, d in fake.calls]
    prompt = "a photo of"  # the text part, whitespace normalised, is the caption prompt
    assert decodings == [
        DecodingOptions(prompt=prompt),
        DecodingOptions(prompt=prompt, max_new_tokens=7),
        DecodingOptions(
            prompt=prompt, do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=2
        ),
        DecodingOptions(prompt=prompt, num_beams=3, num_return_sequences=3),
        DecodingOptions(prompt=prompt, max_new_tokens=5, do_sample=True, top_p=0.5),
    ]


def test_streaming_sends_the_same_caption_piece_by_piece_then_done():
    body = chat(
        image_part(data_url(png(20, 10))), stream=True, stream_options={"include_usage": True}
    )
    with client_for() as client:
        plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 1  # token by token, not one blob
    assert "".join(p for p in pieces if p) == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


class CountingCaptioner(FakeCaptioner):
    """Says what it generated (`details=True`), as the engine's details API does: 3 tokens,
    stopped by max_tokens, whatever the text re-tokenizes to."""

    def caption(self, images, decoding=None, *, batch_size=None, details=False):
        texts = super().caption(images, decoding, batch_size=batch_size)
        return [Generated(t, tokens=3, finish_reason="length") if details else t for t in texts]


def test_finish_reason_and_usage_say_what_generation_did(chatty_model_dir):
    body = chat(image_part(data_url(png(16, 12))), max_tokens=3)
    with client_for(CountingCaptioner()) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        stopped = client.post("/v1/chat/completions", json={**body, "stop": "rgb"}).json()
        plain = client.post("/caption", json={"url": data_url(png(16, 12))}).json()
    [choice] = answer["choices"]
    assert choice["message"]["content"] == "16x12 rgb(200, 40, 40)"  # 4 words: not re-counted
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    assert stopped["choices"][0]["finish_reason"] == "stop"  # cut at a stop string
    assert plain["caption"] == "16x12 rgb(200, 40, 40)"
    # the engine as it is: a caption that filled the clamped limit (the tiny GIT has 62
    # positions for a caption, 256 were asked for) finished for "length"
    captioner = Captioner.from_pretrained(chatty_model_dir)
    limit = captioner.max_new_tokens_limit()
    with client_for(captioner) as client:
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 256})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] >= limit


def test_models_list_the_served_model_behind_the_key():
    with client_for(api_key=KEY) as client:
        assert_openai_error(client.get("/v1/models"), 401, "invalid_api_key")
        auth = {"Authorization": f"Bearer {KEY}"}
        models = client.get("/v1/models", headers=auth).json()
        one = client.get("/v1/models/fake", headers=auth).json()
        other = client.get("/v1/models/gpt-4o", headers=auth)
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake"]
    assert one["id"] == "fake" and one["object"] == "model"
    assert_openai_error(other, 404, "model_not_found")


def test_concurrent_chat_requests_share_generate_calls():
    fake = FakeCaptioner(delay_s=0.05)
    with client_for(fake, max_batch_size=8, max_wait_ms=300) as client:

        def one(i: int) -> httpx.Response:
            url = data_url(png(10 + i, 10, (i * 5, 100, 100)))
            return client.post("/v1/chat/completions", json=chat(image_part(url)))

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith(f"{10 + i}x10 ")
    sizes = [n for n, _ in fake.calls]
    assert sum(sizes) == 12 and max(sizes) > 1


def test_token_pieces_join_to_the_text(tiny_model_dir):
    tokenizer = Captioner.from_pretrained(tiny_model_dir).tokenizer
    for text in ("a red circle on a gray background", "a redd squarex.", "", "x"):
        pieces = token_pieces(text, tokenizer)
        assert "".join(pieces) == text
        assert "".join(token_pieces(text)) == text  # without a tokenizer: words
    assert len(token_pieces("a redd squarex", tokenizer)) > 3


def test_remote_image_urls_follow_the_servers_url_policy(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png(24, 20))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}/a.png"
    try:
        with client_for() as client:  # the default: no URL is fetched
            off = client.post("/v1/chat/completions", json=chat(image_part(remote)))
        with client_for(allow_url_fetch=True) as client:  # loopback is refused by the policy
            private = client.post("/v1/chat/completions", json=chat(image_part(remote)))
        monkeypatch.setattr(fetch, "address_allowed", lambda address: True)
        with client_for(allow_url_fetch=True) as client:
            ok = client.post("/v1/chat/completions", json=chat(image_part(remote)))
    finally:
        files.shutdown()
    assert_openai_error(off, 403, "url_fetch_disabled")
    assert fetch.GENERIC_ERROR in assert_openai_error(private, 422)["message"]
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"].startswith("24x20")


# ---- bad inputs: 4xx, OpenAI's error shape, nothing reaches the model ----

PNG = png()
BAD = [
    ("no image", chat({"type": "text", "text": "describe"}), 400, "missing_image"),
    (
        "text-only string content",
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        400,
        "missing_image",
    ),
    ("two images", chat(image_part(data_url(PNG)), image_part(data_url(PNG))), 400, None),
    ("non-image data URL", chat(image_part(data_url(b"hello", "text/plain"))), 415, None),
    ("image type, text bytes", chat(image_part(data_url(b"%PDF-1.4 text"))), 415, None),
    ("not base64", chat(image_part("data:image/png;base64,@@@")), 422, None),
    ("oversized", chat(image_part(data_url(noise_png(100)))), 413, None),
    ("remote URL, fetch off", chat(image_part("https://example.com/a.png")), 403, None),
    ("file URL", chat(image_part("file:///etc/passwd")), 422, None),
    ("other model", chat(image_part(data_url(PNG)), model="gpt-4o"), 404, "model_not_found"),
    ("no model", {"messages": chat(image_part(data_url(PNG)))["messages"]}, 400, None),
    ("no messages", {"model": "fake"}, 400, None),
    ("bad part", chat({"type": "input_audio", "input_audio": {}}), 400, None),
    (
        "image in system message",
        {"model": "fake", "messages": [{"role": "system", "content": [image_part(data_url(PNG))]}]},
        400,
        None,
    ),  # fmt: skip
    ("temperature too high", chat(image_part(data_url(PNG)), temperature=9), 400, None),
    ("n zero", chat(image_part(data_url(PNG)), n=0), 400, None),
    ("max_tokens text", chat(image_part(data_url(PNG)), max_tokens="many"), 400, None),
    ("unsupported tools", chat(image_part(data_url(PNG)), tools=[{"type": "x"}]), 400, None),
    (
        "long prompt",
        chat({"type": "text", "text": "x" * 300}, image_part(data_url(PNG))),
        400,
        None,
    ),
    ("not an object", ["model"], 400, None),
]


@pytest.mark.parametrize("body,status,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_in_openai_shape(body, status, code):
    fake = FakeCaptioner()
    with client_for(fake, max_upload_bytes=20_000) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert_openai_error(r, status, code)
    assert fake.calls == []


def test_param_names_the_bad_field():
    with client_for() as client:
        r = client.post("/v1/chat/completions", json=chat(image_part(data_url(PNG)), top_p=0))
        assert assert_openai_error(r, 400)["param"] == "top_p"
        r = client.post("/v1/chat/completions", json=chat(image_part(data_url(PNG)), seed=3))
        assert assert_openai_error(r, 400)["param"] == "seed"
        # neutral values of unsupported parameters are fine
        ok = chat(image_part(data_url(PNG)), seed=None, logprobs=False, presence_penalty=0)
        assert client.post("/v1/chat/completions", json=ok).status_code == 200


def test_malformed_json_bodies_and_limits_answer_in_openai_shape():
    with client_for(max_upload_bytes=20_000, max_files=1) as client:
        headers = {"content-type": "application/json"}
        bad = client.post("/v1/chat/completions", content=b"{not json", headers=headers)
        huge = client.post("/v1/chat/completions", content=b"x" * 200_000, headers=headers)
        missing = client.get("/v1/nothing")
        wrong_method = client.get("/v1/chat/completions")
        # a full-size image fits although it is bigger than one upload once base64-encoded
        url = data_url(noise_png(80))  # ~19 KB raw, ~26 KB as base64
        fits = client.post("/v1/chat/completions", json=chat(image_part(url)))
    assert_openai_error(bad, 422)  # the server's one JSON policy, as on /caption
    assert_openai_error(huge, 413)
    assert_openai_error(missing, 404)
    assert_openai_error(wrong_method, 405)
    assert fits.status_code == 200, fits.text


def test_wrong_and_missing_bearer_tokens_are_401():
    with client_for(api_key=KEY) as client:
        body = chat(image_part(data_url(PNG)))
        missing = client.post("/v1/chat/completions", json=body)
        wrong = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"}
        )
        ok = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
    assert_openai_error(missing, 401, "invalid_api_key")
    assert_openai_error(wrong, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200


def test_images_beyond_the_memory_budget_are_refused_in_openai_shape():
    with client_for(max_decoded_bytes=20_000) as client:  # a 100x100 image decodes to 30 KB
        r = client.post("/v1/chat/completions", json=chat(image_part(data_url(png(100, 100)))))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image", r.text


# ---- the official client against a real server ----


@pytest.fixture(scope="module")
def openai_server(chatty_model_dir):
    """`captioner serve` with an API key on a free loopback port; yields (base URL, model id)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "captioner.cli", "serve", str(chatty_model_dir)]
    cmd += ["--port", str(port), "--api_key", KEY, "--max_upload_bytes", "200000"]
    cmd += ["--max_batch_size", "8", "--max_wait_ms", "10"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.3)
        yield url, str(chatty_model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_official_client_streamed_equals_plain_equals_engine(openai_server, chatty_model_dir):
    openai = pytest.importorskip("openai")
    url, model = openai_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [model]
    engine = Captioner.from_pretrained(chatty_model_dir)
    seen = set()
    for color in ((30, 60, 220), (220, 200, 30)):
        image = png(64, 48, color)
        messages = [
            {"role": "system", "content": "You caption images."},
            {"role": "user", "content": [image_part(data_url(image))]},
        ]
        plain = client.chat.completions.create(model=model, messages=messages)
        text = plain.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=messages, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        streamed = "".join(p for p in pieces if p)
        expected = engine.caption(Image.open(io.BytesIO(image)))
        assert text == streamed == expected[0], (text, streamed, expected)
        assert len([p for p in pieces if p]) > 1
        seen.add(text)
    assert len(seen) == 2 and all(seen)  # captions tell the images apart: not trivially equal


@pytest.mark.slow
def test_official_client_sees_4xx_with_openai_errors(openai_server):
    openai = pytest.importorskip("openai")
    url, model = openai_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    cases = [
        ([{"type": "text", "text": "what is this?"}], openai.BadRequestError, 400),
        ([image_part(data_url(PNG))] * 2, openai.BadRequestError, 400),
        ([image_part(data_url(b"plain text", "text/plain"))], openai.APIStatusError, 415),
        ([image_part(data_url(noise_png(300)))], openai.APIStatusError, 413),  # ~270 KB
    ]
    for content, kind, status in cases:
        with pytest.raises(kind) as info:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}]
            )
        assert info.value.status_code == status
        error = info.value.response.json()["error"]  # the client's .body is this inner object
        assert set(error) == {"message", "type", "param", "code"} and error == info.value.body
    for key in ("wrong", None):
        anonymous = openai.OpenAI(base_url=url + "/v1", api_key=key or "-", max_retries=0)
        if key is None:  # no Authorization header at all
            anonymous = anonymous.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as info:
            anonymous.chat.completions.create(
                model=model, messages=[{"role": "user", "content": [image_part(data_url(PNG))]}]
            )
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
