"""Model cards: the `README.md` a training output folder carries to the Hub.

`write_model_card` renders `huggingface_hub.ModelCard` from a template string held here, so it
works offline (no template download, no Hub call). The YAML header is what the Hub indexes:
`pipeline_tag: image-to-text`, `library_name` (`transformers`, or `peft` for a LoRA adapter
folder, which is how the Hub recognises an adapter), `base_model` and `datasets` when they are
Hub ids, and the final metrics in model-index form (`EvalResult`), so they show on the model page.
The body says what a reader needs to trust and use the model: what it started from, which data
and how much, the options that differ from the defaults, the metrics, eight generated captions
beside their references, the training curves, and how to load it with plain transformers (the
family's own class; peft for an adapter) and with captioner.

Every value inserted is escaped for where it goes (names, paths and captions can hold anything:
a folder named with a newline and `---` must not end the front matter or start a section):
markdown text is one line with its markup characters backslash-escaped, code spans are fenced
with more backticks than they hold, Python strings are `repr()`-quoted and shell words
`shlex`-quoted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from captioner.errors import CaptionerError
from captioner.models.build import is_preset, needs_build
from captioner.models.families import family_for, family_named
from captioner.models.lora import ADAPTER_CONFIG

CARD_NAME = "README.md"
NUM_SAMPLES = 8
# Metrics the card reports, in this order: key (without "eval_") -> (label, model-index type).
CARD_METRICS = {
    "bleu_4": ("BLEU-4", "bleu"),
    "meteor": ("METEOR", "meteor"),
    "rouge_l": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr-D", "cider"),
    "spice": ("SPICE", "spice"),
    "wer": ("WER (closest reference)", "wer"),
    "exact_match": ("exact match", "exact_match"),
    "unique_ratio": ("unique captions / images", "unique_ratio"),
    "distinct_1": ("distinct-1", "distinct_1"),
    "distinct_2": ("distinct-2", "distinct_2"),
    "loss": ("loss (teacher-forced)", "loss"),
}
# Option names that may hold credentials: never written into a card that gets published.
_SECRET = re.compile(r"token|password|secret|api_key", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Characters that mean something inline in (GitHub / Hub) markdown, math included.
_MARKUP = re.compile(r"([\\`*_\[\]<>|~!&#$])")
# What the families' usage snippets are given as the model's name, replaced by its Python
# literal afterwards (they write it as "{ref}" today; {ref!r} works the same).
_REF = "CAPTIONER_MODEL_REF"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An image-captioning model ({{ family_label }}) {{ origin }} with captioner.

## Model

- Started from: {{ base }}
- Loads with: `{{ model_class }}` + `AutoProcessor`{{ adapter_note }}
{% if prompt %}- Trained with the caption prompt {{ prompt }} (captioner uses it by default)
{% endif %}
## Data

Source: {{ data }}

| split | images |
|---|---:|
{% for name, size in sizes %}| {{ name }} | {{ size }} |
{% endfor %}
## Training options

{% if options %}Options that differ from the defaults:

| option | value |
|---|---|
{% for name, value in options %}| {{ name }} | {{ value }} |
{% endfor %}{% else %}All options at their defaults.
{% endif %}
## Evaluation

{% if metrics %}Generated captions scored against every reference of each eval image:

| metric | value |
|---|---:|
{% for label, value in metrics %}| {{ label }} | {{ value }} |
{% endfor %}{% else %}No evaluation was run.
{% endif %}
{% if samples %}## Sample captions

| # | generated | references |
|---:|---|---|
{% for caption, references in samples %}| {{ loop.index }} | {{ caption }} | {{ references }} |
{% endfor %}
{% endif %}{% if curves %}## Training curves

![training curves]({{ curves }})

{% endif %}## How to use

With plain transformers:

```python
{{ transformers_code }}
```

With captioner:

```bash
captioner caption {{ model_ref_sh }} photo.jpg folder/
captioner eval {{ model_ref_sh }} DATASET --output_dir eval/
captioner serve {{ model_ref_sh }}
```

```python
from captioner import Captioner

captioner = Captioner.from_pretrained({{ model_ref_py }})
print(captioner.caption(["photo.jpg"]))
```
"""


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    data: str,
    sizes: Mapping[str, int],
    options_changed: Mapping[str, Any],
    metrics: Mapping[str, Any],
    samples: Sequence[tuple[str, Sequence[str]]],
    curves: str | None = "curves.png",
    family: str | None = None,
    repo_id: str | None = None,
    prompt: str | None = None,
) -> Path:
    """Write `output_dir/README.md` and return its path.

    `base_model`: what training started from (a Hub id, a folder, a preset or a composition);
    `data`: the dataset source; `sizes`: images per split; `options_changed`: options that differ
    from their defaults (credentials are left out); `metrics`: final scores (`eval_` prefixes
    are dropped); `samples`: (generated caption, references) pairs, the first eight are shown;
    `curves`: an image file in `output_dir` (skipped when it is not there); `family`: the config's
    family's name (`git`, `llava`, `chat`, ...: models/families), read from `config.json` when
    not given; `repo_id`: the Hub id the usage snippets name (default: the folder).
    """
    out = Path(output_dir)
    adapter = _adapter_base(out)
    family_obj = _family(family, out)
    family = family_obj.name if family_obj else family
    model_class = family_obj.model_class if family_obj else "AutoModel"
    model_ref = repo_id or str(output_dir)
    scores = {k.removeprefix("eval_"): v for k, v in metrics.items()}
    shown = [
        (key, _number(scores[key])) for key in CARD_METRICS if _number(scores.get(key)) is not None
    ]
    hub_base = adapter if adapter is not None and _is_hub_id(adapter) else None
    if hub_base is None and _is_hub_id(base_model):
        hub_base = base_model
    card_data = ModelCardData(
        model_name=_one_line(Path(model_ref).name) or "captioner-model",  # YAML: one line
        pipeline_tag="image-to-text",
        library_name="peft" if adapter is not None else "transformers",
        base_model=hub_base,
        datasets=[data] if _is_hub_id(data) else None,
        tags=["image-captioning", "captioner", *([family] if family else [])],
        eval_results=[
            EvalResult(
                task_type="image-to-text",
                task_name="Image captioning",
                dataset_type=data if _is_hub_id(data) else "imagefolder",
                dataset_name=_one_line(_display_name(data)),
                dataset_split="test",
                metric_type=CARD_METRICS[key][1],
                metric_name=CARD_METRICS[key][0],
                metric_value=round(value, 4),
            )
            for key, value in shown
        ]
        or None,
    )
    curves = curves if curves and (out / curves).is_file() else None
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=_text(Path(model_ref).name or "captioning model"),
        family_label=family or "unknown family",
        origin=_origin(base_model),
        base=_describe_base(base_model, adapter),
        model_class=model_class,
        adapter_note=" (a LoRA adapter: needs `peft`)" if adapter is not None else "",
        prompt=_code(prompt) if prompt else None,
        data=_describe_data(data),
        sizes=[(_text(name), f"{int(n):,}") for name, n in sizes.items()],
        options=[
            (_code(name, cell=True), _text(_format_option(value)))
            for name, value in sorted(options_changed.items())
            if not _SECRET.search(name)
        ],
        metrics=[(CARD_METRICS[key][0], f"{value:.4f}") for key, value in shown],
        samples=[
            (_text(caption) or "*(empty)*", _text(" / ".join(refs)))
            for caption, refs in list(samples)[:NUM_SAMPLES]
        ],
        curves=curves,
        model_ref_sh=_shell_word(model_ref),
        model_ref_py=_python_str(model_ref),
        transformers_code=_transformers_code(family_obj, model_class, model_ref, adapter, prompt),
    )
    path = out / CARD_NAME
    out.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def _transformers_code(
    family, model_class: str, ref: str, adapter: str | None, prompt: str | None
) -> str:
    """The card's snippet: plain transformers (+ peft for an adapter), the family's recipe.
    Every name in it is a Python literal (`_python_str`), whatever the family writes."""
    imports = [
        "from PIL import Image",
        f"from transformers import AutoProcessor, {model_class}",
        *(["from peft import PeftModel"] if adapter is not None else []),
    ]
    if family is None:
        run = (
            f'model = {model_class}.from_pretrained("{_REF}")\n'
            f'processor = AutoProcessor.from_pretrained("{_REF}")'
        )
    else:
        run = family.usage_snippet(model_class, _REF, prompt)
    run = run.replace(repr(_REF), f'"{_REF}"')  # one spelling, whichever the family used
    if adapter is not None:
        run = run.replace(
            f'model = {model_class}.from_pretrained("{_REF}")',
            f"base = {model_class}.from_pretrained({_python_str(adapter)})\n"
            f'model = PeftModel.from_pretrained(base, "{_REF}").merge_and_unload()',
        )
    run = run.replace(f'"{_REF}"', _python_str(ref))
    return "\n".join([*imports, "", run])


def _family(name: str | None, out: Path):
    """The family named, else the one config.json says; None when neither is known."""
    try:
        if name:
            return family_named(name)
        config = json.loads((out / "config.json").read_text())
        return family_for(config)
    except (OSError, ValueError, CaptionerError):
        return None


def _adapter_base(out: Path) -> str | None:
    """The base model a LoRA adapter folder names, or None when `out` is not an adapter."""
    path = out / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    return str(base) if base else "BASE_MODEL"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def _origin(base_model: str) -> str:
    return "trained from scratch" if is_preset(base_model) else "fine-tuned"


def _describe_base(base_model: str, adapter: str | None) -> str:
    if is_preset(base_model):
        text = f"the captioner preset `{base_model}`, built for this run from the training captions"
    elif needs_build(base_model):
        text = f"the composition {_code(base_model)} (a vision tower and a text decoder)"
    elif _is_hub_id(base_model):  # [\w.-] only: nothing to escape
        text = f"[{base_model}](https://huggingface.co/{base_model})"
    else:
        text = _code(base_model)
    if adapter is not None:
        text += f"; the LoRA adapter applies to {_code(adapter)}"
    return text


def _describe_data(data: str) -> str:
    if _is_hub_id(data):
        return f"[{data}](https://huggingface.co/datasets/{data})"
    return f"{_code(_display_name(data))} (a local dataset)"


def _display_name(data: str) -> str:
    if _is_hub_id(data):
        return data
    return Path(data).name or str(data)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value else None  # NaN is not a score


def _format_option(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _text(text: Any) -> str:
    """Markdown text that reads as written: one line, its markup characters escaped (so it
    also stays inside a table cell)."""
    return _MARKUP.sub(r"\\\1", _one_line(text))


def _code(text: Any, *, cell: bool = False) -> str:
    """A one-line code span, fenced with more backticks than the text holds (`cell`: inside a
    table, where a pipe must still be escaped)."""
    text = _one_line(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    if text.startswith("`") or text.endswith("`"):
        text = f" {text} "
    if cell:
        text = text.replace("|", "\\|")
    return f"{fence}{text}{fence}"


def _python_str(text: str) -> str:
    """A Python string literal of `text`: repr(), double-quoted when that needs no escape."""
    literal = repr(text)
    if literal.startswith("'") and '"' not in text and "'" not in text:
        literal = f'"{literal[1:-1]}"'
    return literal


def _shell_word(text: str) -> str:
    """`text` as one shell word; characters a shell line cannot hold as typed (newlines,
    control characters) in bash's $'...' quoting, so the code block stays one line."""
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(map(_ansi_c, text)) + "'"


def _ansi_c(char: str) -> str:
    """One character inside bash's $'...'."""
    if char.isprintable() and char not in "\\'":
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 256 else f"\\U{code:08x}"
