"""One owner per option set: every command that loads a model takes every `LoadOptions` field as
a flag and hands it to the loader as given; `serve` takes every `ServerSettings` field and hands
the app a `ServerSettings` checked before the model loads. The cases are generated from the
dataclasses, so a new field is tested everywhere at once (and a field with no sample value fails
here until it gets one). Fast: no model loads, no server starts, no Ray instance starts."""

from __future__ import annotations

import dataclasses
import sys
import typing

import pytest
from typer.testing import CliRunner

from captioner.cli import APP_FILLED, _plain_type, app
from captioner.errors import CaptionerError
from captioner.options import LoadOptions
from captioner.serve.settings import ServerSettings

# A value other than the default for each load option (valid on its own).
LOAD_SAMPLES = {"device": "cpu", "dtype": "bfloat16", "int8": True, "trust_remote_code": True}
# Each command that loads a model for captioning, as argv before the flags under test.
LOADING_COMMANDS = {
    "caption": ["caption", "MODEL", "x.png", "--no_progress"],
    "eval": ["eval", "MODEL", "DATA"],
    "serve": ["serve", "MODEL"],
    "caption --engine ray": ["caption", "MODEL", "x.png", "--no_progress", "--engine", "ray"],
}


class Stop(CaptionerError):
    """Raised where the model would load: the test has seen what it came for."""


def argv_for(name: str, value: object) -> list[str]:
    if value is True:
        return [f"--{name}"]
    if isinstance(value, tuple):
        return [arg for item in value for arg in (f"--{name}", str(item))]
    return [f"--{name}", str(value)]


@pytest.fixture
def loads(monkeypatch) -> list[LoadOptions]:
    """`Captioner.from_pretrained` records its LoadOptions and stops; Ray runs nothing, but the
    Work its actors would get is recorded through the same list."""
    from captioner.engine import Captioner
    from captioner.jobs.evaluate import DataArguments
    from captioner.jobs.executors import ray as ray_executor

    seen: list[LoadOptions] = []

    def from_pretrained(path, load=None, **overrides):
        seen.append((load or LoadOptions()).replace(**overrides))
        raise Stop("stop")

    def on_ray(images, work, progress=None, **cluster):
        seen.append(work.load)
        raise Stop("stop")
        yield  # a generator, as the real one

    monkeypatch.setattr(Captioner, "from_pretrained", from_pretrained)
    monkeypatch.setattr(ray_executor, "caption_on_ray", on_ray)
    monkeypatch.setattr(  # eval: no dataset to read
        "captioner.jobs.evaluate.split_options", lambda model, given: (DataArguments("d"), 0)
    )
    monkeypatch.setattr("captioner.jobs.evaluate.choose_split", lambda job, args, seed: [])
    return seen


def test_every_load_option_has_a_sample():
    assert set(LOAD_SAMPLES) == {f.name for f in dataclasses.fields(LoadOptions)}


@pytest.mark.parametrize("command", LOADING_COMMANDS)
@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LoadOptions)])
def test_each_command_takes_each_load_flag(command, field, loads):
    value = LOAD_SAMPLES[field]
    result = CliRunner().invoke(app, [*LOADING_COMMANDS[command], *argv_for(field, value)])
    assert isinstance(result.exception, Stop), (result.output, result.exception)
    assert loads == [LoadOptions(**{field: value})]  # that flag, and only it, reached the loader


def test_ray_actors_load_with_the_jobs_load_options(monkeypatch):
    pytest.importorskip("ray")
    from captioner.engine import Captioner
    from captioner.jobs.executors import Work
    from captioner.jobs.executors.ray import _CaptionActor

    seen = []
    monkeypatch.setattr(Captioner, "from_pretrained", lambda path, load: seen.append(load))
    load = LoadOptions(**{**LOAD_SAMPLES, "int8": False})  # int8 goes with float32
    _CaptionActor(Work("MODEL", load), threads=1)
    assert seen == [load]


def test_a_bad_load_option_is_one_line_before_anything_loads(loads):
    for argv in LOADING_COMMANDS.values():
        result = CliRunner().invoke(app, [*argv, "--int8", "--dtype", "bfloat16"])
        assert isinstance(result.exception, CaptionerError) and "--int8" in str(result.exception)
    assert loads == []


# ---- serve: every ServerSettings field ----

SERVER_FIELDS = [f for f in dataclasses.fields(ServerSettings) if f.name not in APP_FILLED]


def server_sample(f: dataclasses.Field) -> object:
    """A valid value other than the default, from the field's type."""
    kind = _plain_type(typing.get_type_hints(ServerSettings)[f.name])
    samples = {int: (f.default or 0) + 1, float: (f.default or 0) + 1.5, bool: True,
               str: "a-key", tuple: ("a.example", "b.example")}  # fmt: skip
    return samples[kind]


@pytest.fixture
def served(monkeypatch) -> list[ServerSettings]:
    pytest.importorskip("fastapi")
    import uvicorn

    from captioner.engine import Captioner

    seen: list[ServerSettings] = []
    monkeypatch.setattr(Captioner, "from_pretrained", lambda path, load: object())
    monkeypatch.setattr("captioner.serve.app.create_app", lambda model, s: seen.append(s))
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    return seen


@pytest.mark.parametrize("field", SERVER_FIELDS, ids=lambda f: f.name)
def test_serve_takes_each_server_setting(field, served):
    value = server_sample(field)
    result = CliRunner().invoke(app, ["serve", "MODEL", *argv_for(field.name, value)])
    assert result.exit_code == 0, (result.output, result.exception)
    [settings] = served
    assert getattr(settings, field.name) == value
    assert settings.model_name == "MODEL"
    others = {f.name for f in SERVER_FIELDS} - {field.name, "allowed_hosts"}
    assert all(getattr(settings, n) == getattr(ServerSettings(), n) for n in others)


def test_serve_defaults_are_the_settings_defaults(served):
    assert CliRunner().invoke(app, ["serve", "MODEL", "--host", "0.0.0.0"]).exit_code == 0
    assert served == [ServerSettings(model_name="MODEL")]  # any host on a public bind
    assert CliRunner().invoke(app, ["serve", "MODEL"]).exit_code == 0
    assert served[1].allowed_hosts and "localhost" in served[1].allowed_hosts  # loopback names


@pytest.mark.parametrize("field", [f for f in SERVER_FIELDS if f.name.startswith("max_")],
                         ids=lambda f: f.name)  # fmt: skip
def test_a_bad_server_setting_is_one_line_before_the_model_loads(field, loads, monkeypatch,
                                                                capsys):  # fmt: skip
    from captioner import cli

    monkeypatch.setattr(sys, "argv", ["captioner", "serve", "MODEL", f"--{field.name}", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"--{field.name} must be" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert loads == []  # refused before the model loads


def test_api_key_comes_from_the_environment_too(served, monkeypatch):
    monkeypatch.setenv("CAPTIONER_API_KEY", "from-env")
    assert CliRunner().invoke(app, ["serve", "MODEL"]).exit_code == 0
    assert served[0].api_key == "from-env"


def test_review_takes_the_shared_server_and_load_flags(monkeypatch):
    pytest.importorskip("fastapi")
    seen = {}
    monkeypatch.setattr("captioner.serve.review.run_review", lambda source, **kw: seen.update(kw))
    argv = ["review", "DATA", "--api_key", "k", "--allowed_hosts", "a.example",
            "--device", "cpu", "--trust_remote_code", "--image_column", "file"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen["api_key"] == "k" and seen["allowed_hosts"] == ["a.example"]
    assert seen["device"] == "cpu" and seen["trust_remote_code"] is True
    assert seen["image_column"] == "file" and seen["caption_column"] is None
    bad = CliRunner().invoke(app, ["review", "DATA", "--api_key", " "])
    assert "--api_key must not be empty" in str(bad.exception)


@pytest.mark.parametrize("setting", ["auto", "off", "some/folder"])
def test_eval_and_caption_take_the_feature_cache_setting(setting, monkeypatch):
    """Both commands hand `--feature_cache` to their job (default auto: the model's own cache)."""
    import captioner.jobs.caption as caption_job
    import captioner.jobs.evaluate as eval_job

    seen: list[str] = []

    def run_eval(job):
        seen.append(job.feature_cache)
        raise Stop("stop")

    def run_caption(job, *args, **kwargs):
        seen.append(job.options.feature_cache)
        raise Stop("stop")

    monkeypatch.setattr(eval_job, "run_eval", run_eval)
    monkeypatch.setattr(caption_job, "run_caption", run_caption)
    flag = [] if setting == "auto" else ["--feature_cache", setting]
    for argv in (["eval", "MODEL", "DATA"], ["caption", "MODEL", "x.png", "--no_progress"]):
        result = CliRunner().invoke(app, [*argv, *flag])
        assert isinstance(result.exception, Stop), (result.output, result.exception)
    assert seen == [setting, setting]
