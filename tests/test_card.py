"""Model cards: written offline with huggingface_hub.ModelCard, read back with ModelCard.load."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_images
from huggingface_hub import ModelCard

from captioner.hub import push_files
from captioner.training.card import write_model_card

METRICS = {
    "eval_loss": 1.25,
    "eval_bleu_4": 0.31234,
    "eval_meteor": None,  # no Java: not scored, not shown
    "eval_rouge_l": 0.5,
    "eval_cider": 0.0,  # a zero is a score and is shown
    "eval_wer": 0.4,
    "eval_exact_match": 0.125,
    "eval_runtime": 3.2,  # not a quality metric
    "eval_samples": 40,
}
SAMPLES = [(f"caption {i}", [f"reference {i}", f"other | {i}"]) for i in range(10)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Writing and loading a card must never touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access while writing a model card")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _model_dir(root: Path, model_type: str = "git") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    (root / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def _card(out: Path, **overrides) -> Path:
    kwargs = dict(
        base_model="microsoft/git-base",
        data="reach-vb/pokemon-blip-captions",
        sizes={"train": 750, "eval": 83},
        options_changed={"learning_rate": 5e-5, "num_train_epochs": 50, "hub_token": "hf_secret"},
        metrics=METRICS,
        samples=SAMPLES,
    )
    return write_model_card(out, **{**kwargs, **overrides})


def _front_matter(path: Path) -> dict:
    text = path.read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_card_metadata_loads_back(tmp_path):
    out = _model_dir(tmp_path / "git-base-pokemon")
    path = _card(out)
    assert path == out / "README.md"
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "image-to-text"
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "microsoft/git-base"
    assert card.data.datasets == ["reach-vb/pokemon-blip-captions"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"loss", "bleu", "rouge", "cider", "wer", "exact_match"}
    assert results["bleu"].metric_value == 0.3123 and results["cider"].metric_value == 0.0
    assert results["bleu"].task_type == "image-to-text"
    assert results["bleu"].dataset_type == "reach-vb/pokemon-blip-captions"
    index = _front_matter(path)["model-index"]  # the raw YAML is model-index form
    assert index[0]["name"] == "git-base-pokemon"
    assert index[0]["results"][0]["metrics"][0] == {
        "type": "bleu",
        "value": 0.3123,
        "name": "BLEU-4",
    }


def test_card_body_has_every_section(tmp_path):
    out = _model_dir(tmp_path / "run")
    text = _card(out).read_text()
    for heading in ("## Model", "## Data", "## Training options", "## Evaluation"):
        assert heading in text, heading
    assert "[microsoft/git-base](https://huggingface.co/microsoft/git-base)" in text
    assert "https://huggingface.co/datasets/reach-vb/pokemon-blip-captions" in text
    assert "| train | 750 |" in text and "| eval | 83 |" in text
    assert "| `learning_rate` | 5e-05 |" in text and "| `num_train_epochs` | 50 |" in text
    assert "hub_token" not in text and "hf_secret" not in text  # credentials never published
    assert "| BLEU-4 | 0.3123 |" in text and "| CIDEr-D | 0.0000 |" in text
    assert "METEOR" not in text and "runtime" not in text
    rows = re.findall(r"^\| (\d+) \| caption \d+ \|", text, re.M)
    assert rows == [str(i) for i in range(1, 9)]  # eight samples
    assert "reference 0 / other \\| 0" in text  # a pipe stays inside its table cell
    assert "![training curves](curves.png)" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "peft" not in text
    assert "captioner caption" in text and "Captioner.from_pretrained" in text


def test_card_from_a_preset_on_local_data_has_no_hub_metadata(tmp_path):
    out = _model_dir(tmp_path / "tiny-run")
    (out / "curves.png").unlink()
    path = _card(out, base_model="tiny", data=str(tmp_path / "scenes"), curves="curves.png")
    card = ModelCard.load(path)
    assert card.data.base_model is None and card.data.datasets is None
    assert {r.dataset_name for r in card.data.eval_results} == {"scenes"}
    text = path.read_text()
    assert "trained from scratch" in text and "preset `tiny`" in text
    assert "training curves" not in text  # no curves.png in the folder: no broken image


@pytest.mark.parametrize(
    "model_type, cls",
    [
        ("blip", "BlipForConditionalGeneration"),
        ("vision-encoder-decoder", "VisionEncoderDecoderModel"),
        ("llava", "LlavaForConditionalGeneration"),
    ],
)
def test_card_names_the_family_class(tmp_path, model_type, cls):
    out = _model_dir(tmp_path / model_type, model_type)
    text = _card(out, repo_id="you/captioner").read_text()
    assert f'model = {cls}.from_pretrained("you/captioner")' in text
    assert "captioner caption you/captioner" in text
    assert ("apply_chat_template" in text) == (model_type == "llava")


def test_lora_adapter_card(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "microsoft/git-base", "peft_type": "LORA"})
    )
    path = _card(out, family="git", base_model="microsoft/git-base", metrics={}, samples=[])
    card = ModelCard.load(path)
    assert card.data.library_name == "peft" and card.data.base_model == "microsoft/git-base"
    assert card.data.eval_results is None
    text = path.read_text()
    assert "from peft import PeftModel" in text and "needs `peft`" in text
    assert 'base = AutoModelForCausalLM.from_pretrained("microsoft/git-base")' in text
    assert "No evaluation was run." in text and "## Sample captions" not in text


def test_push_uploads_the_card(tmp_path):
    out = _model_dir(tmp_path / "run")
    _card(out)
    assert {"README.md", "curves.png", "config.json"} <= set(push_files(out))


def test_the_cards_transformers_snippet_captions(tiny_model_dir, tmp_path):
    """The plain-transformers code in the card runs as written (on a real saved model)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    text = _card(out, base_model="tiny", data="scenes/").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    image = make_images(tmp_path / "img", 1)[0]
    code = code.replace("photo.jpg", str(image)).replace("max_new_tokens=30", "max_new_tokens=4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]


def _training_writes_cards() -> bool:
    import captioner.training.trainer

    return hasattr(captioner.training.trainer, "write_model_card")


@pytest.mark.slow
@pytest.mark.skipif(not _training_writes_cards(), reason="training does not write a card yet")
def test_training_writes_the_card(tmp_path, monkeypatch):
    from captioner.data.scenes import generate_scenes
    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    data = generate_scenes(tmp_path / "scenes", n=20, seed=2)
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]
    flags += ["--per_device_train_batch_size", "8", "--max_new_tokens", "4", "--test_size", "0.4"]
    flags += ["--dataloader_num_workers", "0", "--num_beams", "2"]
    model, data_args, decoding, args = parse_train_args(
        ["--model", "tiny", "--data", str(data), "--output_dir", str(out), *flags]
    )
    train(model, data_args, args, decoding)
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and card.data.library_name == "transformers"
    evaluated = json.loads((out / "eval_results.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["cider"] == round(evaluated["eval_cider"], 4)
    text = (out / "README.md").read_text()
    assert "preset `tiny`" in text and "| train | 12 |" in text and "| eval (scored) | 8 |" in text
    assert "| `max_steps` | 2 |" in text and "| `num_beams` | 2 |" in text
    assert "`learning_rate` | 0.001" in text  # the preset's own default differs from transformers'
    assert "remove_unused_columns" not in text and "prediction_loss_only" not in text
    assert len(re.findall(r"^\| \d \| ", text, re.M)) == 8  # eight samples with references
    assert "![training curves](curves.png)" in text
    assert "README.md" in push_files(out)


def test_every_inserted_value_is_escaped_for_where_it_goes(tmp_path):
    """Folder, data, option names, prompt and an adapter's recorded base can hold anything: a
    newline and `---` must not end the front matter or start a section, markup stays text, and
    the usage code means what it says."""
    import ast

    nasty = "x\n---\n# owned <img src=x onerror=alert(1)> `tick` | [link](javascript:1) $m$"
    out = tmp_path / "run\n---\ntitle: pwned\n# run `x`"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "git"}))
    base = 'base")\nimport os; os.system("touch PWNED")  #'
    (out / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    path = _card(out, data=nasty, prompt=nasty, samples=[(nasty, [nasty])],
                 options_changed={"lr\n---\n| evil": nasty})  # fmt: skip
    text = path.read_text()
    lines = text.splitlines()
    assert lines.count("---") == 2 and lines[0] == "---"  # only the front matter's own fences
    front = _front_matter(path)
    assert front["library_name"] == "peft" and "title" not in front
    assert [line for line in lines if line.startswith("# ")] == [
        "# run --- title: pwned \\# run \\`x\\`"
    ]
    end = lines.index("---", 1)
    markdown_it = pytest.importorskip("markdown_it")
    html = (
        markdown_it.MarkdownIt("commonmark", {"html": True})
        .enable("table")
        .render("\n".join(lines[end + 1 :]))
    )
    assert html.count("<h1>") == 1 and "<hr" not in html  # no section or rule of its own
    assert "<img" not in html and 'href="javascript' not in html  # markup shown as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "$m$" in html
    prompt = "x --- # owned &lt;img src=x onerror=alert(1)&gt; `tick` | [link](javascript:1) $m$"
    assert f"<code>{prompt}</code>" in html  # a code span holding backticks, whole
    assert "<td><code>lr --- | evil</code></td>" in html  # one cell, not split at the pipe
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(python) == 2
    strings = {n.value for code in python for n in ast.walk(ast.parse(code))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}  # fmt: skip
    assert {base, str(out)} <= strings  # the names, as data: no statement of their own
    imports = [a.name for n in ast.walk(ast.parse(python[0])) if isinstance(n, ast.Import)
               for a in n.names]  # fmt: skip
    assert "os" not in imports
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert len(bash) == 3 and all(line.startswith("captioner ") for line in bash)
    assert bash[0].startswith("captioner caption $'") and "\\x0a" in bash[0]
