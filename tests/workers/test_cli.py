"""`llava-serve worker` flags become WorkerSettings; unset flags keep defaults."""

from __future__ import annotations

import argparse

import pytest

from workers.cli import add_worker_arguments, build_engine, worker_settings_from_args
from workers.scripted import ScriptedEngine


def _parse(*argv: str) -> argparse.Namespace:
    return add_worker_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_become_settings():
    args = _parse(
        "--model-path", "/models/llava", "--model-name", "llava", "--device", "cpu", "--dtype", "float32",
        "--max-batch", "3", "--token-budget", "999", "--redis-url", "redis://h:1/2", "--drain-timeout-s", "7",
        "--engine", "scripted", "--compile", "--compile-backend", "aot_eager",
    )  # fmt: skip
    settings = worker_settings_from_args(args)
    assert settings.compile and settings.compile_backend == "aot_eager"
    assert settings.model_path == "/models/llava" and settings.resolved_model_name() == "llava"
    assert (settings.device, settings.dtype, settings.max_batch, settings.token_budget) == ("cpu", "float32", 3, 999)
    assert settings.redis_url == "redis://h:1/2" and settings.drain_timeout_s == 7
    assert args.engine == "scripted"


def test_the_old_drain_timeout_flag_still_works_and_is_hidden(capsys: pytest.CaptureFixture[str]):
    assert worker_settings_from_args(_parse("--model-path", "m", "--drain-timeout", "4")).drain_timeout_s == 4
    with pytest.raises(SystemExit):
        _parse("--help")
    out = capsys.readouterr().out
    assert "--drain-timeout-s" in out and "--drain-timeout " not in out


def test_unset_flags_keep_defaults_and_the_scripted_engine_builds():
    settings = worker_settings_from_args(_parse("--model-path", "/m/tiny"))
    assert settings.max_batch == 8 and settings.drain_timeout_s == 30 and settings.resolved_model_name() == "tiny"
    assert not settings.compile and settings.compile_backend == "inductor"
    engine, device = build_engine(settings, "scripted")
    assert isinstance(engine, ScriptedEngine) and engine.max_batch == 8 and device == "scripted"
    with pytest.raises(ValueError):
        build_engine(settings, "nope")


def test_threads_and_prefill_tokens_flags():
    import argparse

    from workers.cli import add_worker_arguments, worker_settings_from_args

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    settings = worker_settings_from_args(
        parser.parse_args(["--model-path", "m", "--threads", "1", "--prefill-tokens", "64"])
    )
    assert (settings.threads, settings.prefill_tokens) == (1, 64)
    assert worker_settings_from_args(parser.parse_args(["--model-path", "m"])).threads is None


def test_a_compile_that_fails_names_the_backend_and_the_way_out(tiny_model_path, monkeypatch):
    from workers.engine import TransformersEngine

    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(TransformersEngine, "warmup", broken)
    args = _parse("--model-path", str(tiny_model_path), "--device", "cpu", "--compile")
    with pytest.raises(RuntimeError, match="compiled decode step with inductor failed .*no C\\+\\+ compiler.*without"):
        build_engine(worker_settings_from_args(args), "transformers")


def test_scripted_step_delay_reaches_the_scripted_engine(monkeypatch):
    import workers.cli
    from cli.main import build_parser

    args = build_parser().parse_args(
        ["worker", "--engine", "scripted", "--model-path", "m", "--scripted-step-delay-s", "0.01"]
    )
    seen = {}

    def run_worker(settings, *, engine_kind, scripted_step_delay_s):
        engine, _ = build_engine(settings, engine_kind, scripted_step_delay_s=scripted_step_delay_s)
        seen["delay"] = engine.step_delay_s
        return 0

    monkeypatch.setattr(workers.cli, "run_worker", run_worker)
    assert args.run(args) == 0 and seen["delay"] == 0.01
    default = build_parser().parse_args(["worker", "--engine", "scripted", "--model-path", "m"])
    assert default.scripted_step_delay_s == workers.cli.SCRIPTED_STEP_DELAY_S


def test_image_modes_flag_names_the_modes_the_model_was_trained_with(capsys: pytest.CaptureFixture[str]):
    from contract.messages import ImageMode

    assert worker_settings_from_args(_parse("--model-path", "m")).image_modes == list(ImageMode)
    settings = worker_settings_from_args(_parse("--model-path", "m", "--image-modes", "Resize, default"))
    assert settings.image_modes == [ImageMode.resize, ImageMode.default]
    with pytest.raises(SystemExit):
        _parse("--model-path", "m", "--image-modes", "default,letterbox")
    assert "image mode 'letterbox' is not one of crop, resize, pad, default" in capsys.readouterr().err
