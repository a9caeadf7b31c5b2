"""Every vision-language family beyond GIT/BLIP/VED/LLaVA, end to end, on tiny random models
built offline (tests/tiny_vlms.py) and loaded like Hub checkpoints.

Per family: `captioner train` on 8 images until captioning them back gives their captions
exactly (this is what proves the prompt masking, the chat templating and the prompt stripping),
then `caption`, `eval` and `serve` (`/caption` and `/v1/chat/completions`) on the result; then
LoRA training and `captioner merge`, and the merged folder captions the same in a subprocess that
only has plain transformers.

Adding a family (docs/architecture.md): a module in captioner/models/families/, and its tiny
model in tests/tiny_vlms.py; this file then runs it through everything above.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tiny_vlms import MEMORISE_STEPS, TINY_VLM_KINDS, build_tiny_vlm
from typer.testing import CliRunner

from captioner.cli import app
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models.build import load_model
from captioner.models.families import FAMILIES, family_for, family_of
from captioner.models.families.base import end_token_ids
from captioner.training.arguments import parse_train_args
from captioner.training.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220),
           "white": (255, 255, 255)}  # fmt: skip
BACKGROUNDS = {"gray": (120, 120, 120), "black": (0, 0, 0)}
# Cased, punctuated captions with a trigger word: they must come back exactly as written.
CAPTIONS = [
    f"sks: a {colour} square on a {bg} background" if i % 3 == 0 else
    f"A {colour} square, on {bg}." if i % 3 == 1 else f"a {colour} square on a {bg} background"
    for i, (bg, colour) in enumerate((bg, c) for bg in BACKGROUNDS for c in COLOURS)
]  # fmt: skip
TRAIN = [
    "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "0",
    "--lr_scheduler_type", "constant", "--test_size", "0", "--eval_strategy", "no",
    "--save_strategy", "no", "--dataloader_num_workers", "0", "--logging_steps", "25",
    "--report_to", "none", "--max_new_tokens", "24",
]  # fmt: skip
LORA_STEPS = 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """8 images with `.txt` sidecars: a coloured square on one of two backgrounds."""
    folder = tmp_path_factory.mktemp("families_data")
    pairs = [(bg, c) for bg in BACKGROUNDS for c in COLOURS]
    for i, ((bg, colour), caption) in enumerate(zip(pairs, CAPTIONS, strict=True)):
        image = Image.new("RGB", (40, 40), BACKGROUNDS[bg])
        ImageDraw.Draw(image).rectangle([8, 8, 30, 30], fill=COLOURS[colour])
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def images_of(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*.png"), key=lambda p: int(p.stem))


class Runs:
    """Each family's tiny model, memorised model, adapter and merged model, made once."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir, self.done = root, data_dir, {}

    def get(self, kind: str) -> dict[str, Path]:
        if kind not in self.done:
            base = build_tiny_vlm(kind, self.root / kind / "base", CAPTIONS)
            trained = self._train(kind, base, "trained", ["--max_steps", str(MEMORISE_STEPS[kind])])
            # LoRA on the memorised model: its captions are decisive (no near-ties between
            # tokens), so plain transformers must give them back exactly after the merge.
            adapter = self._train(
                kind, trained, "lora", ["--max_steps", str(LORA_STEPS), "--lora_r", "4"]
            )
            merged = self.root / kind / "merged"
            result = CliRunner().invoke(app, ["merge", str(adapter), str(merged)])
            assert result.exit_code == 0, result.output
            self.done[kind] = {"base": base, "trained": trained, "adapter": adapter,
                               "merged": merged}  # fmt: skip
        return self.done[kind]

    def _train(self, kind: str, base: Path, name: str, extra: list[str]) -> Path:
        out = self.root / kind / name
        args = ["--model", str(base), "--data", str(self.data_dir), "--output_dir", str(out)]
        model_args, data_args, decoding, training_args = parse_train_args([*args, *TRAIN, *extra])
        train(model_args, data_args, training_args, decoding)
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("families"), data_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {kind: build_tiny_vlm(kind, root / kind, CAPTIONS) for kind in TINY_VLM_KINDS}


@pytest.mark.parametrize("kind", TINY_VLM_KINDS)
def test_labels_are_the_caption_and_its_end_token_only(kind, tiny_dirs, data_dir):
    """Everything the family puts before the caption (image tokens, template, prompt) and
    after its end token is -100; what is left decodes to the caption."""
    model, processor = load_model(tiny_dirs[kind])
    family = family_of(model)
    images = [Image.open(p).convert("RGB") for p in images_of(data_dir)[:3]]
    captions = CAPTIONS[:3]
    batch = family.training_inputs(processor, images, captions, None)
    for row, caption in zip(batch["labels"], captions, strict=True):
        kept = row[row != -100]
        assert kept.numel() > 0
        text = processor.tokenizer.decode(kept, skip_special_tokens=True)
        assert text.strip() == caption
        assert int(kept[-1]) in end_token_ids(processor) | {processor.tokenizer.eos_token_id}
        assert int(kept[0]) not in end_token_ids(processor)  # no template token before it
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_every_family_is_listed_and_unknown_ones_fail_in_one_line():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for family in FAMILIES:
        assert family.name in result.output
    with pytest.raises(CaptionerError, match="not supported.*captioner models") as err:
        family_for({"model_type": "bert"})
    assert "\n" not in str(err.value)
    assert family_for({"model_type": "smolvlm"}).name == "chat"  # any chat VLM
    assert family_for({"model_type": "paligemma"}).name == "paligemma"


@pytest.mark.slow
@pytest.mark.parametrize("kind", TINY_VLM_KINDS)
def test_family_memorises_captions_then_captions_evaluates_and_serves(kind, runs, data_dir):
    from fastapi.testclient import TestClient

    from captioner.serve import create_app

    paths = runs.get(kind)
    images = images_of(data_dir)
    captioner = Captioner.from_pretrained(paths["trained"], device="cpu")
    assert family_of(captioner.model).name != "git"
    # 1. Captioned back, exactly (cased, punctuated, the trigger word), in a batch and alone.
    assert captioner.caption(images) == CAPTIONS
    assert captioner.caption(images[3], batch_size=1) == [CAPTIONS[3]]
    # 2. `captioner caption` writes the same rows.
    rows_file = paths["trained"].parent / "captions.jsonl"
    result = CliRunner().invoke(
        app, ["caption", str(paths["trained"]), str(data_dir), "--output", str(rows_file)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    by_name = {Path(r["image"]).name: r["caption"] for r in rows}
    assert [by_name[p.name] for p in images] == CAPTIONS
    # 3. `captioner eval` scores every row as an exact match.
    report = paths["trained"].parent / "eval"
    result = CliRunner().invoke(app, ["eval", str(paths["trained"]), str(data_dir),
                                      "--split", "all", "--output_dir", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert _find(metrics, "exact_match") == 1.0
    # 4. The server: captioner's own endpoint and the OpenAI-compatible one.
    png = images[5].read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    with TestClient(create_app(captioner, model_name=kind)) as client:
        r = client.post("/caption", files={"file": ("5.png", png, "image/png")})
        assert r.status_code == 200, r.text
        assert _find(r.json(), "caption") == CAPTIONS[5]
        body = {"model": kind, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == CAPTIONS[5]


# Plain transformers, no captioner: load the merged folder and caption each image with the
# family's own recipe (tiny_vlms.load_processor is AutoProcessor, built image-only where a
# video processor would need torchvision).
PLAIN = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
sys.path.insert(0, sys.argv[1])
from tiny_vlms import load_processor
out = {}
for kind, family, folder, images, prompt in json.loads(sys.argv[2]):
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = load_processor(folder)
    captions = []
    for path in images:
        image = Image.open(path).convert("RGB")
        if family == "chat":
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            turn = [{"role": "user", "content": content}]
            text = processor.apply_chat_template(turn, add_generation_prompt=True)
            inputs = processor(images=[[image]], text=[text], return_tensors="pt")
        elif family == "paligemma":
            inputs = processor(images=[image], text=["<image>" + prompt], return_tensors="pt")
        else:
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        n = inputs["input_ids"].shape[1]
        if ids.shape[1] >= n and torch.equal(ids[:, :n], inputs["input_ids"]):
            ids = ids[:, n:]
        text = processor.batch_decode(ids, skip_special_tokens=True)[0]
        captions.append(" ".join(text.split()))
    out[kind] = captions
assert not [m for m in sys.modules if m.split(".")[0] == "captioner"]
print(json.dumps(out))
"""
PROMPTS = {"chat": "Describe this image in one sentence.", "paligemma": "caption en",
           "florence2": "<CAPTION>", "blip-2": ""}  # fmt: skip


@pytest.mark.slow
def test_lora_adapters_merge_into_folders_plain_transformers_loads(runs, data_dir):
    images = [str(p) for p in images_of(data_dir)[:4]]
    jobs, expected = [], {}
    for kind in TINY_VLM_KINDS:
        paths = runs.get(kind)
        adapter = Captioner.from_pretrained(paths["adapter"], device="cpu")
        expected[kind] = adapter.caption(images)
        family = family_for(json.loads((paths["merged"] / "config.json").read_text()))
        jobs.append([kind, family.name, str(paths["merged"]), images, PROMPTS[family.name]])
        # The merged folder is a whole model with the base's weights names, and LoRA moved
        # some of its language model's weights (and none of its vision tower's).
        assert not (paths["merged"] / "adapter_config.json").exists()
        before = load_file(paths["trained"] / "model.safetensors")
        after = load_file(paths["merged"] / "model.safetensors")
        assert before.keys() == after.keys()
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert moved and all(k.endswith(".weight") for k in moved), kind
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tests_dir = str(Path(__file__).parent)
    run = subprocess.run(
        [sys.executable, "-c", PLAIN, tests_dir, json.dumps(jobs)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "captioner" not in run.stderr
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert plain == expected
    assert expected == {kind: CAPTIONS[:4] for kind in TINY_VLM_KINDS}  # LoRA kept them


def _find(tree, key: str):
    """The first value under `key` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def test_processors_without_torchvision_are_image_only_and_save_as_the_real_class(
    tiny_dirs, tmp_path
):
    from transformers.utils import is_torchvision_available

    from captioner.models.families.processors import load_processor

    processor = load_processor(str(tiny_dirs["qwen2_vl"]))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert getattr(processor, "video_processor", None) is None or is_torchvision_available()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"  # loads with AutoProcessor elsewhere
    again = load_processor(str(tmp_path))
    assert again.chat_template == processor.chat_template and again.chat_template


def test_a_processor_that_needs_torchvision_fails_in_one_line(tiny_dirs, monkeypatch):
    import transformers
    from transformers.utils import is_torchvision_available

    from captioner.models.families import processors

    if is_torchvision_available():
        pytest.skip("torchvision is installed here")

    def needs_torchvision(*args, **kwargs):
        raise ImportError("SomeImageProcessorFast requires the Torchvision library")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(CaptionerError, match="needs torchvision") as err:
        processors.load_processor(str(tiny_dirs["gemma3"]))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_model_cards_snippet_captions_with_plain_transformers(runs, data_dir):
    """The card's plain-transformers code, as written, gives the trained caption back (for the
    families whose processor AutoProcessor builds here, i.e. without a video processor)."""
    import re

    image = images_of(data_dir)[2]
    snippets = []
    for kind in ("paligemma", "gemma3", "florence2", "blip-2"):
        text = (runs.get(kind)["trained"] / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
        snippets.append(code.replace("photo.jpg", str(image)))
    program = "\n".join(f"exec({code!r}, {{}})" for code in snippets)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-4:] == [CAPTIONS[2]] * 4
