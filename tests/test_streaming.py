"""Token streaming: `Captioner.caption_stream` (the engine's streamer hook) and the server's
streamed answers, which must equal the plain captions and arrive while the batch still runs."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_images
from PIL import Image

from captioner.engine import Captioner, StreamEvent

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def captioner(chatty_model_dir) -> Captioner:
    return Captioner.from_pretrained(chatty_model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("stream_images"), 6)


def joined(events: list[StreamEvent]) -> dict[int, tuple[str, object, int]]:
    """index -> (the pieces joined, the final caption, how many non-empty pieces)."""
    out: dict[int, tuple[str, object, int]] = {}
    for e in events:
        text, caption, n = out.get(e.index, ("", None, 0))
        assert caption is None, f"image {e.index} had an event after its last"
        out[e.index] = (text + e.text, e.caption, n + bool(e.text))
    return out


def slowed(captioner: Captioner, seconds: float):
    """A forward pre-hook that sleeps: each decoding step takes at least `seconds`."""
    return captioner.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def test_streamed_pieces_join_to_the_caption_batch_by_batch(captioner, images):
    expected = captioner.caption(images, batch_size=4, max_new_tokens=24, details=True)
    events = list(captioner.caption_stream(images, batch_size=4, max_new_tokens=24))
    got = joined(events)
    assert sorted(got) == list(range(len(images)))
    for i, (text, caption, pieces) in got.items():
        assert text == caption == expected[i], (i, text, caption, expected[i])
        assert caption.tokens == expected[i].tokens and pieces > 1  # word by word, not one blob
        assert caption.finish_reason == expected[i].finish_reason
    # the images of a batch stream side by side: the first image is not done before others start
    first_done = next(k for k, e in enumerate(events) if e.done)
    assert len({e.index for e in events[:first_done]}) > 1


def test_usage_and_finish_reason_count_the_generated_ids(captioner, images):
    events = list(captioner.caption_stream(images[:2], max_new_tokens=3))
    for _, caption, _ in joined(events).values():
        assert caption.finish_reason == "length" and caption.tokens == 3
    # the clamp: a tiny GIT has few text positions, so asking for more is cut to them
    limit = captioner.max_new_tokens_limit()
    events = list(captioner.caption_stream(images[:1], max_new_tokens=limit + 50))
    [(text, caption, _)] = joined(events).values()
    plain = captioner.caption(images[:1], max_new_tokens=limit + 50, details=True)[0]
    assert text == plain and caption.tokens == plain.tokens <= limit
    assert caption.finish_reason == plain.finish_reason
    if caption.tokens == limit:
        assert caption.finish_reason == "length"


def test_first_piece_arrives_long_before_the_caption_is_done(captioner, images):
    hook = slowed(captioner, 0.02)
    try:
        start = time.perf_counter()
        first = None
        for event in captioner.caption_stream(images[:1], max_new_tokens=30, min_new_tokens=30):
            if first is None and event.text:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
    finally:
        hook.remove()
    assert first is not None and first < total / 2, (first, total)


def test_leaving_the_loop_stops_generation(captioner, images):
    steps = []
    hook = captioner.model.register_forward_pre_hook(lambda m, a: steps.append(1))
    try:
        stream = captioner.caption_stream(images[:1], max_new_tokens=40, min_new_tokens=40)
        next(e for e in stream if e.text)
        stream.close()  # the caller leaves after its first piece
    finally:
        hook.remove()
    assert len(steps) < 20, len(steps)


def test_beams_and_suffix_stream_the_same_caption(captioner, images):
    for options in ({"num_beams": 2}, {"suffix": " #tag", "prefix": "Photo: "},
                    {"max_words": 3}):  # fmt: skip
        expected = captioner.caption(images[:2], max_new_tokens=12, **options)
        got = joined(list(captioner.caption_stream(images[:2], max_new_tokens=12, **options)))
        assert [got[i][0] for i in range(2)] == expected, options


def test_a_model_without_a_streaming_generate_answers_in_one_piece(captioner, images):
    expected = captioner.caption(images[:2], max_new_tokens=8)

    class NoStreamer(torch.nn.Module):  # what an ONNX export's generate looks like to the engine
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config
            self.generation_config, self.dtype = model.generation_config, model.dtype

        def generate(self, **kwargs):
            assert "streamer" not in kwargs
            return self.inner.generate(**kwargs)

    plain = Captioner(NoStreamer(captioner.model), captioner.processor, device="cpu")
    plain.family = captioner.family
    got = joined(list(plain.caption_stream(images[:2], max_new_tokens=8)))
    assert [got[i][0] for i in range(2)] == expected
    assert all(n == 1 for _, _, n in got.values() if _)


# ---- the server: streamed through the batcher ----


@pytest.fixture(scope="module")
def live_server(captioner):
    """The app around the chatty GIT, each decoding step slowed to 30 ms, on uvicorn in a
    thread (a TestClient would hand over the body only once it is complete)."""
    uvicorn = pytest.importorskip("uvicorn")
    from test_serve import _free_port

    from captioner.serve import create_app

    steps: list[float] = []

    def slow_step(module, args) -> None:  # returns None: the inputs stay as they are
        steps.append(time.perf_counter())
        time.sleep(0.03)

    hook = captioner.model.register_forward_pre_hook(slow_step)
    app = create_app(captioner, model_name="chatty", max_batch_size=8, max_wait_ms=20)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", steps
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        hook.remove()


def chat_messages(image: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_openai_client_gets_its_first_chunk_before_half_the_caption(live_server, captioner):
    openai = pytest.importorskip("openai")
    from test_serve import png

    url, _ = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
    image = png(48, 40, (30, 60, 220))
    messages = chat_messages(image)
    start = time.perf_counter()
    plain = client.chat.completions.create(model="chatty", messages=messages, max_tokens=24)
    plain_s = time.perf_counter() - start
    start, first, pieces, chunks = time.perf_counter(), None, [], []
    stream = client.chat.completions.create(
        model="chatty", messages=messages, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    expected = captioner.caption(Image.open(io.BytesIO(image)), max_new_tokens=24, details=True)
    text = plain.choices[0].message.content
    assert "".join(pieces) == text == expected[0] and len(pieces) > 5
    assert plain.usage.completion_tokens == chunks[-1].usage.completion_tokens == 24
    assert expected[0].tokens == 24 and expected[0].finish_reason == "length"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason] == ["length"]
    assert first < plain_s / 2, (first, plain_s)
    print(f"\nTTFT {first * 1000:.0f} ms, non-streamed {plain_s * 1000:.0f} ms")


def test_concurrent_streams_share_batches_and_each_equals_its_caption(live_server, captioner):
    from test_serve import png

    url, _ = live_server
    images = [png(40 + i, 40, (i * 50 % 256, 90, 200)) for i in range(4)]
    expected = captioner.caption([Image.open(io.BytesIO(b)) for b in images], max_new_tokens=16)
    before = httpx.get(url + "/health").json()["largest_batch"]

    def streamed(image: bytes) -> str:
        body = {"model": "chatty", "messages": chat_messages(image), "max_tokens": 16,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
        return "".join(d.get("content") or "" for d in deltas)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(streamed, images))
    assert got == expected
    assert max(before, httpx.get(url + "/health").json()["largest_batch"]) > 1


def test_a_client_that_leaves_mid_stream_stops_its_row(live_server):
    from test_serve import png

    url, steps = live_server
    body = {"model": "chatty", "messages": chat_messages(png(50, 50, (200, 200, 30))),
            "max_tokens": 28, "stream": True}  # fmt: skip
    steps.clear()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: hang up
    time.sleep(0.5)
    assert len(steps) < 20, len(steps)  # generation stopped, not run to its 28 tokens
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_caption_route_streams_for_the_page(live_server, captioner):
    from test_serve import png

    url, _ = live_server
    image = png(44, 36, (10, 200, 90))
    form = {"stream": "true", "max_new_tokens": "12"}
    with httpx.stream("POST", url + "/caption", files={"file": ("a.png", image)}, data=form,
                      timeout=60) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    expected = captioner.caption(Image.open(io.BytesIO(image)), max_new_tokens=12)[0]
    assert "".join(e.get("text", "") for e in events) == events[-1]["caption"] == expected
    assert len(events) > 3 and events[-1]["model"] == "chatty"


@pytest.mark.slow
def test_page_shows_the_caption_while_it_is_written(live_server, captioner, tmp_path):
    from test_serve import CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (`make browser` installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = live_server
    image_path = tmp_path / "page.png"
    Image.new("RGB", (64, 48), (220, 120, 30)).save(image_path)
    expected = captioner.caption(image_path, max_new_tokens=30)[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector('#caption[data-state="streaming"]', timeout=60_000)
            partial = page.text_content("#caption")
            page.wait_for_selector('#caption[data-state="done"]', timeout=60_000)
            shown = page.text_content("#caption")
        finally:
            browser.close()
    assert shown == expected and partial and expected.startswith(partial) and partial != shown
