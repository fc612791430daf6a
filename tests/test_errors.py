"""User errors vs bugs: every user-facing error type lives in ``omnifuse.errors`` (a leaf module) and
derives from ``OmnifuseError``; the CLI prints those as one line, anything else keeps its traceback."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from conftest import make_model, tiny_config

from omnifuse import errors
from omnifuse.errors import OmnifuseError

ERROR_TYPES = [getattr(errors, name) for name in errors.__all__ if name != "USER_ERRORS"]

# Where each type was defined before errors.py held them; users and tests import them from there.
OLD_HOMES = {
    "CheckpointError": "omnifuse.checkpoint",
    "ConfigError": "omnifuse.config",
    "ContextOverflowError": "omnifuse.inference",
    "DataFormatError": "omnifuse.training.llava_data",
    "FeatureCountError": "omnifuse.fusion",
    "ImageError": "omnifuse.processing.image",
    "InsufficientMemoryError": "omnifuse.machine",
    "PlanError": "omnifuse.planner.plan",
    "TokenRuleError": "omnifuse.planner.tokens",
    "TokenizerError": "omnifuse.processing.text",
    "TruncationError": "omnifuse.training.collate",
}


def test_errors_module_imports_nothing_from_omnifuse():
    code = "import sys, omnifuse.errors; print(sorted(m for m in sys.modules if m.startswith('omnifuse')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "['omnifuse', 'omnifuse.errors']"


def test_every_error_type_derives_from_the_base():
    assert len(ERROR_TYPES) >= len(OLD_HOMES) + 3  # the old types plus RequestError, BatchFullError, the base
    for cls in ERROR_TYPES:
        assert inspect.isclass(cls) and issubclass(cls, OmnifuseError) and issubclass(cls, ValueError), cls
        assert cls.__doc__, cls  # says what input it reports
    assert OmnifuseError in errors.USER_ERRORS
    assert not {ValueError, RuntimeError, FileNotFoundError} & set(errors.USER_ERRORS)  # bugs keep a traceback


@pytest.mark.parametrize("name,module", sorted(OLD_HOMES.items()))
def test_error_types_stay_importable_from_their_old_modules(name, module):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_batch_full_is_still_a_runtime_error():
    assert issubclass(errors.BatchFullError, RuntimeError)


# --- raise sites: bad input raises a user error, an internal invariant does not ----------------

def _tiny_model():
    return make_model(tiny_config("early"))


def test_bad_sampling_options_are_config_errors():
    from omnifuse.inference import SamplingConfig

    for kwargs in ({"temperature": float("nan")}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": -1}):
        with pytest.raises(errors.ConfigError):
            SamplingConfig(**kwargs)


def test_requests_a_decode_batch_cannot_take_are_user_errors():
    from omnifuse.inference import DecodeBatch, SamplingConfig, generate

    model = _tiny_model()
    with pytest.raises(errors.ContextOverflowError, match="exceeds the context length 512"):
        DecodeBatch(model, max_rows=1, max_len=513)
    batch = DecodeBatch(model, max_rows=1, max_len=8, sampling=SamplingConfig(max_new_tokens=20))
    with pytest.raises(errors.RequestError, match="at least one token"):
        batch.add([])
    with pytest.raises(errors.ContextOverflowError, match="the prompt is 8 tokens"):
        batch.add(list(range(8)))
    batch.add(list(range(5)))
    with pytest.raises(errors.BatchFullError, match="the batch is full"):
        batch.add([1])
    with pytest.raises(errors.ContextOverflowError, match=r"rows \[0\] hold 8 tokens"):
        for _ in range(10):
            batch.step()
    with pytest.raises(errors.RequestError, match="at least one token"):
        generate(model, [[1], []], None, SamplingConfig(max_new_tokens=1))


def test_bad_settings_of_the_diagnostic_set_and_the_collator_are_config_errors():
    from omnifuse.training.collate import ExampleBuilder
    from omnifuse.training.diagnostic import DiagnosticSet

    for kwargs in ({"split": "nope"}, {"skills": ("nope",)}, {"image_size": 1}, {"weights": {"ocr": 0}}):
        with pytest.raises(errors.ConfigError):
            DiagnosticSet(**{"split": "train", "size": 4, **kwargs})
    with pytest.raises(errors.ConfigError, match="truncation"):
        ExampleBuilder(None, 16, truncation="cut")


def test_an_unsupported_hf_vision_config_is_a_checkpoint_error():
    from omnifuse.encoders.mllama_vision import mllama_vision_kwargs

    with pytest.raises(errors.CheckpointError, match="hidden_act='swish'"):
        mllama_vision_kwargs({"hidden_act": "swish"})


def test_out_of_range_intermediate_layers_are_refused_by_the_config():
    from omnifuse.config import VisionConfig

    with pytest.raises(errors.ConfigError, match=r"intermediate_layers \[4\]"):
        VisionConfig(num_layers=4, intermediate_layers=(0, 4))


def test_an_internal_invariant_stays_a_plain_error():
    from omnifuse.inference.cache import KVCache

    small, big = KVCache(1, 1, 1, 4, 2), KVCache(1, 1, 1, 8, 2)
    big.advance(torch.ones(1, 8, dtype=torch.long))  # a request of 8 cached tokens
    with pytest.raises(ValueError, match="does not fit a cache of 4") as err:
        small.insert(0, big)
    assert not isinstance(err.value, OmnifuseError)


# --- the CLI ------------------------------------------------------------------------------------

def _fail_building_the_pipeline(monkeypatch, error: Exception) -> None:
    from omnifuse.pipeline import Pipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(Pipeline, "from_preset", fail)


GENERATE = ["generate", "--preset", "tiny-early", "--prompt", "hi", "--max-new-tokens", "1"]


def test_cli_lets_an_internal_invariant_failure_keep_its_traceback(monkeypatch, capsys):
    from omnifuse.cli import main

    _fail_building_the_pipeline(monkeypatch, ValueError("shapes (3, 4) and (5, 4) disagree"))
    with pytest.raises(ValueError, match="disagree") as err:
        main(GENERATE)
    assert not isinstance(err.value, OmnifuseError)
    assert "omnifuse: error:" not in capsys.readouterr().err


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda cls: cls.__name__)
def test_cli_prints_every_user_error_as_one_line(monkeypatch, capsys, cls):
    from omnifuse.cli import main

    _fail_building_the_pipeline(monkeypatch, cls("the input is wrong in a named way"))
    assert main(GENERATE) == 1
    err = capsys.readouterr().err
    assert err == "omnifuse: error: the input is wrong in a named way\n"


def test_console_script_shows_the_traceback_of_an_internal_error():
    code = ("import sys\n"
            "from omnifuse.pipeline import Pipeline\n"
            "def fail(*a, **k):\n"
            "    raise ValueError('an invariant failed')\n"
            "Pipeline.from_preset = fail\n"
            "from omnifuse.cli import main\n"
            f"sys.exit(main({GENERATE!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1  # Python's own exit status for an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr and "ValueError: an invariant failed" in proc.stderr
    assert "omnifuse: error:" not in proc.stderr
