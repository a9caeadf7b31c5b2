"""Token streaming: `Captioner.caption_stream` (the engine's streamer hook) and the server's
streamed answers, which must equal the plain captions and arrive while the batch still runs."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_images

from captioner.engine import Captioner, StreamEvent


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
