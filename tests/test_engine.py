"""The batched captioning engine: batching must not change captions; every decoding option works."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_images
from PIL import Image

from captioner.engine import Captioner
from captioner.errors import BadImageError, CaptionerError


@pytest.fixture(scope="module")
def captioner(chatty_model_dir) -> Captioner:
    return Captioner.from_pretrained(chatty_model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("gen_images"), 11)


def test_batched_equals_one_at_a_time_greedy(captioner, images):
    batched = captioner.caption(images, batch_size=4, max_new_tokens=12)  # 4+4+3: ragged end
    single = [captioner.caption(p, batch_size=1, max_new_tokens=12)[0] for p in images]
    assert batched == single
    assert all(batched) and len(set(batched)) > len(images) // 2  # real, image-dependent text


def test_batched_equals_single_with_beams_and_prompt(captioner, images):
    kw = dict(num_beams=3, max_new_tokens=8, prompt="a red")
    batched = captioner.caption(images[:5], batch_size=5, **kw)
    single = [captioner.caption(p, batch_size=1, **kw)[0] for p in images[:5]]
    assert batched == single
    # The prompt is part of the caption; [SEP] is stripped from it, or the caption would end there.
    assert all(c.startswith("a red") and len(c) > len("a red") for c in batched)


def test_accepts_paths_pil_bytes_and_dataset_dicts(captioner, images):
    path = images[0]
    sources = [path, str(path), Image.open(path), path.read_bytes(), {"bytes": None, "path": path}]
    captions = captioner.caption(sources, max_new_tokens=6)
    assert len(set(captions)) == 1 and captions[0]


def test_num_return_sequences_with_sampling_and_beams(captioner, images):
    torch.manual_seed(0)
    sampled = captioner.caption(
        images[:3], do_sample=True, top_p=0.9, temperature=1.2, num_return_sequences=3,
        max_new_tokens=6,
    )  # fmt: skip
    assert [len(s) for s in sampled] == [3, 3, 3]
    assert all(len(set(s)) > 1 for s in sampled)  # sampling gives different captions
    beams = captioner.caption(images[:2], num_beams=4, num_return_sequences=2, max_new_tokens=6)
    assert [len(b) for b in beams] == [2, 2]
    with pytest.raises(CaptionerError, match="num_return_sequences"):
        captioner.caption(images[:1], num_return_sequences=2)
    with pytest.raises(CaptionerError, match="do_sample"):
        captioner.caption(images[:1], temperature=0.5)


def test_bad_words_are_never_generated(captioner, images, monkeypatch):
    from conftest import TINY_CAPTIONS

    outputs: list[torch.Tensor] = []
    generate = captioner.model.generate

    def spy(*args, **kwargs):
        outputs.append(out := generate(*args, **kwargs))
        return out

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.caption(images, max_new_tokens=20)
    said = {i for o in outputs for i in o.flatten().tolist()}
    # a caption word the model does say (each is one byte-level BPE token, e.g. "Ġwhite")
    words = {w for c in TINY_CAPTIONS for w in c.split()}
    spelled = {w: captioner.tokenizer(w, add_special_tokens=False).input_ids for w in words}
    word = next(w for w, ids in sorted(spelled.items()) if len(ids) == 1 and ids[0] in said)
    assert any(spelled[word][0] in o for o in outputs)  # the model does say it...
    outputs.clear()
    captioner.caption(images, max_new_tokens=20, bad_words=[word])
    assert not any(spelled[word][0] in o for o in outputs)  # ...and then it does not


def test_bad_words_are_deduplicated_and_unspellable_ones_constrain_nothing(captioner, images):
    ids = captioner.bad_words_ids(["white", "white", " white ", "White"])
    assert len(ids) == len({tuple(i) for i in ids}) > 0
    unk = captioner.tokenizer.unk_token_id
    assert all(unk not in i for i in captioner.bad_words_ids(["你好", "zzzqqq"]))
    plain = captioner.caption(images[:2], max_new_tokens=8)
    # words the model cannot say (or the tokenizer cannot spell): the same captions, no error
    assert captioner.caption(images[:2], max_new_tokens=8, bad_words=["你好", "ǂǂǂ"]) == plain


def test_details_count_the_generated_tokens_and_say_why_generation_stopped(captioner, images):
    from captioner.decoding import Generated

    short = captioner.caption(images[:2], max_new_tokens=3, details=True)
    assert all(isinstance(c, Generated) for c in short)
    for caption in short:  # the random model never ends this soon
        assert caption.finish_reason == "length" and caption.tokens == 3
    # counted from the ids: re-tokenising the text would not give 3 (a random model's tokens)
    resolved = captioner.resolve(max_new_tokens=256, min_new_tokens=200)
    limit = captioner.max_new_tokens_limit()
    assert resolved.max_new_tokens == limit and resolved.min_new_tokens == limit


def test_bad_image_is_reported_and_the_rest_captioned(captioner, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    results = dict(captioner.caption_iter([images[0], bad, images[1]], max_new_tokens=5))
    assert isinstance(results[1], BadImageError) and results[1].path == str(bad)
    assert isinstance(results[0], str) and isinstance(results[2], str)
    with pytest.raises(BadImageError, match="bad.png"):
        captioner.caption([images[0], bad])


def test_urls_download_with_byte_limit_and_fail_clearly_offline(captioner, images, monkeypatch):
    png = io.BytesIO()
    Image.open(images[0]).save(png, "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        assert captioner.caption(url, max_new_tokens=6) == captioner.caption(
            images[0], max_new_tokens=6
        )
        monkeypatch.setattr("captioner.data.fetch.FETCH_MAX_BYTES", 100)
        with pytest.raises(BadImageError, match="byte limit") as err:
            captioner.caption(url)
        assert err.value.path == url
    finally:
        server.shutdown()  # the socket still accepts connections, but nobody answers
    monkeypatch.setattr("captioner.data.fetch.FETCH_TIMEOUT_S", 0.3)
    with pytest.raises(BadImageError, match="timed out"):
        captioner.caption(url)
    server.server_close()
    with pytest.raises(BadImageError, match="download failed") as err:
        captioner.caption(url)  # connection refused, as without network
    assert err.value.path == url


def test_auto_batch_size_and_background_loader(captioner, images):
    from captioner.engine import CPU_MAX_BATCH

    assert captioner.auto_batch_size() == CPU_MAX_BATCH  # tiny model on CPU: memory is plentiful
    assert captioner.auto_batch_size(max_new_tokens=10**9) == 1  # a cache that cannot fit: 1
    # num_workers=1 decodes in a worker process; results match the in-process path.
    assert captioner.caption(images, batch_size=2, num_workers=1, max_new_tokens=5) == (
        captioner.caption(images, batch_size=2, num_workers=0, max_new_tokens=5)
    )


def test_live_training_model_is_captioned_in_eval_mode_and_left_training(captioner, images):
    expected = captioner.caption(images[:3], max_new_tokens=6)
    captioner.model.train()  # as the training callback hands it over
    try:
        assert captioner.caption(images[:3], max_new_tokens=6) == expected  # no dropout
        assert captioner.model.training
    finally:
        captioner.model.eval()


def _noisy(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _tiny_blip(tok):
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ids = dict(bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    ids.update(eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    config = BlipConfig(
        vision_config=dict(small, image_size=32, patch_size=8),
        text_config=dict(small, vocab_size=len(tok), encoder_hidden_size=32, **ids),
    )
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok)
    return _noisy(BlipForConditionalGeneration(config)), processor


def _tiny_vision_encoder_decoder(tok):
    from transformers import (
        BertConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        VisionTextDualEncoderProcessor,
        ViTConfig,
        ViTImageProcessorPil,
    )

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**small, image_size=32, patch_size=8),
        BertConfig(**small, vocab_size=len(tok), is_decoder=True, add_cross_attention=True),
    )
    model = VisionEncoderDecoderModel(config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tok.cls_token_id
        cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.sep_token_id
    processor = VisionTextDualEncoderProcessor(
        ViTImageProcessorPil(size={"height": 32, "width": 32}), tok
    )
    return _noisy(model), processor


@pytest.mark.parametrize("build", [_tiny_blip, _tiny_vision_encoder_decoder])
def test_other_families_batch_identically_and_take_prompts(build, images):
    from conftest import TINY_CAPTIONS

    from captioner.models.tokenizer import train_caption_tokenizer

    model, processor = build(
        train_caption_tokenizer(TINY_CAPTIONS, vocab_size=200, model_max_length=64)
    )
    captioner = Captioner(model, processor, device="cpu")
    for prompt in (None, "a red"):
        kw = dict(max_new_tokens=8, prompt=prompt)
        batched = captioner.caption(images[:4], batch_size=4, **kw)
        assert batched == [captioner.caption(p, batch_size=1, **kw)[0] for p in images[:4]]
        assert all(batched) and all(c.startswith(prompt or "") for c in batched)
    beams = captioner.caption(images[:2], num_beams=2, num_return_sequences=2, max_new_tokens=5)
    assert [len(b) for b in beams] == [2, 2]


def test_a_bad_image_in_a_loader_worker_is_an_error_row_not_a_crash(captioner, images, tmp_path):
    """BadImageError crosses the worker's pickle boundary intact (it used to fail to unpickle)."""
    import pickle

    err = BadImageError("x.png", "not an image")
    assert pickle.loads(pickle.dumps(err)).reason == "not an image"
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    results = dict(
        captioner.caption_iter([*images, bad], batch_size=2, num_workers=1, max_new_tokens=4)
    )
    assert isinstance(results[len(images)], BadImageError)
    assert all(isinstance(results[i], str) for i in range(len(images)))
