"""Every settings field checked at one door (core/fields.py), whatever its source: a --config
YAML or JSON file, a run's config.json, an adapter file's metadata, the flags. Property-based:
hypothesis draws a wrong value for any field of any settings group, and each source must answer
with one line naming the field, exit 2, nothing written and no run deleted."""

from __future__ import annotations

import json
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torch

from qdylora import QDyLoRAConfig, QDyLoRAError
from qdylora.cli import main
from qdylora.core.fields import Range, check_value
from qdylora.training.adapter_file import FORMAT, read_adapter_metadata
from qdylora.training.settings import DataSettings, RunSettings, TrainSettings

GROUPS = {"adapter": QDyLoRAConfig, "data": DataSettings, "train": TrainSettings}
FIELDS = [(group, name, tp) for group, cls in GROUPS.items()
          for name, tp in typing.get_type_hints(cls, include_extras=True).items()]


def _base(tp):
    """(the type without Annotated and Optional, its bounds, whether None is allowed)."""
    bounds = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)]
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    optional = False
    if typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = True
        tp = args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return tp, bounds, optional


def wrong_values(tp) -> st.SearchStrategy:
    """Values the field must refuse."""
    tp, bounds, optional = _base(tp)
    junk = [st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            min_size=1, max_size=2)]
    if not optional:
        junk.append(st.none())
    words = st.text(min_size=1, max_size=8).filter(lambda t: _not_a_number(t))
    if tp is int:
        below = [st.integers(max_value=int(b.low) - (0 if b.open_low else 1)) for b in bounds if b.low is not None]
        return st.one_of(*junk, st.booleans(), words,
                         st.floats(allow_nan=True).filter(lambda x: not float(x).is_integer()), *below)
    if tp is float:
        below = [st.floats(max_value=b.low, exclude_max=not b.open_low, allow_nan=False) for b in bounds
                 if b.low is not None]
        above = [st.floats(min_value=b.high, exclude_min=not b.open_high, allow_nan=False) for b in bounds
                 if b.high is not None]
        return st.one_of(*junk, st.booleans(), words, st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf"]),
                         *below, *above)
    if tp is bool:
        return st.one_of(*junk, st.integers(), words, st.floats())
    if tp is str:
        return st.one_of(*junk, st.integers(), st.floats(), st.booleans())
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return st.one_of(*junk, st.integers(), st.text(max_size=8).filter(lambda t: t not in choices))
    # target_modules: a text or a list of texts
    return st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=3))


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


field_and_value = st.sampled_from(FIELDS).flatmap(
    lambda f: st.tuples(st.just(f[0]), st.just(f[1]), wrong_values(f[2])))

SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(capsys, code, name):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qdylora: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert name in errors[0], (name, err)


@SLOW
@given(field_and_value)
def test_from_dict_names_the_source_and_the_field(case):
    group, name, value = case
    with pytest.raises(QDyLoRAError) as e:
        RunSettings.from_dict({group: {name: value}}, where="RUN/config.json")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"RUN/config.json [{group}]: {name} "), message


@SLOW
@given(field_and_value, st.sampled_from(["yaml", "json"]))
def test_a_config_file_with_a_wrong_value_is_one_line_and_nothing_is_touched(tmp_path, capsys, case, kind):
    group, name, value = case
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text('{"status": "done"}')  # a finished run that --overwrite would replace
    path = tmp_path / f"settings.{kind}"
    flat = {name: value}
    path.write_text(json.dumps(flat) if kind == "json" else yaml.safe_dump(flat))
    code = main(["train", "--config", str(path), "--out", str(out), "--overwrite", "--quiet"])
    one_line(capsys, code, name)
    assert [p.name for p in out.iterdir()] == ["summary.json"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field_and_value)
def test_a_run_config_with_a_wrong_value_is_one_line(tmp_path, capsys, case):
    group, name, value = case
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "adapter.safetensors").write_bytes(b"")
    record = {"qdylora_version": "0.1.0", "settings": {group: {name: value}}}
    (run / "config.json").write_text(json.dumps(record))
    one_line(capsys, main(["sweep", str(run), "--quiet"]), name)
    assert sorted(p.name for p in run.iterdir()) == ["adapter.safetensors", "config.json"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(n, tp) for g, n, tp in FIELDS if g == "adapter"]).flatmap(
    lambda f: st.tuples(st.just(f[0]), wrong_values(f[1]))))
def test_adapter_metadata_with_a_wrong_value_is_one_line(tmp_path_factory, case):
    name, value = case
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "config": json.dumps({name: value}),
                                                          "base_fingerprint": "0"})
    with pytest.raises(QDyLoRAError) as e:
        read_adapter_metadata(path)
    assert "\n" not in str(e.value) and f"config: {name} " in str(e.value), str(e.value)


@pytest.mark.parametrize("metadata, message", [
    ({"format": FORMAT}, "has no config and no base_fingerprint"),
    ({"format": FORMAT, "config": "{", "base_fingerprint": "0"}, "'config' is not valid JSON"),
    ({"format": FORMAT, "config": "[1]", "base_fingerprint": "0"}, "'config' is not a JSON object"),
    ({"format": FORMAT, "config": "{}", "base_fingerprint": "0", "extra": "x"}, "'extra' is not valid JSON"),
    ({"format": FORMAT, "config": "{}"}, "has no base_fingerprint"),
])
def test_damaged_adapter_metadata_is_one_line(tmp_path, metadata, message):
    path = tmp_path / "adapter.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(QDyLoRAError, match=message):
        read_adapter_metadata(path)


@pytest.mark.parametrize("text, expected", [
    ("lr: 1e-4", 1e-4),  # PyYAML reads 1e-4 as text (no dot): the number it spells
    ("lr: 2.0e-4", 2e-4),
    ("lr: 3", 3.0),
])
def test_numbers_yaml_reads_as_text_are_numbers(tmp_path, text, expected):
    from qdylora.cli import _read_settings_file

    path = tmp_path / "s.yaml"
    path.write_text(text + "\n")
    values = _read_settings_file(str(path))
    assert RunSettings.from_dict(values).train.lr == expected


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "/dev/zero"], "config file /dev/zero is not a regular file"),
    (["train", "--rank-weights", "nan,1", "--ranks", "1,2", "--rank-rule", "step"], "rank_weights must be finite"),
    (["train", "--rank-weights", "1,inf", "--ranks", "1,2"], "rank_weights must be finite"),
    (["train", "--rank-weights", "0,0", "--ranks", "1,2"], "not all 0"),
    (["train", "--val-max-examples", "-1"], "val_max_examples must be at least 0, got -1"),
    (["train", "--prompt-template", "{instruction:d}", "--response-template", "{output}"],
     "'{instruction:d}' is not a plain field"),
    (["train", "--prompt-template", "{instruction!x}", "--response-template", "{output}"], "is not a plain field"),
    (["train", "--prompt-template", "{instruction:>2000000000}", "--response-template", "{output}"],
     "is not a plain field"),
    (["train", "--prompt-template", "{instruction:{output}}", "--response-template", "{output}"],
     "is not a plain field"),
    (["train", "--prompt-template", "{a[0]}", "--response-template", "{output}"], "is not a plain field"),
    (["train", "--device", "foo"], "unknown device 'foo'"),
    (["sweep", "RUN", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["sweep", "RUN", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["sweep", "RUN", "--max-examples", "-5"], "--max-examples must be at least 0, got -5"),
    (["sweep", "RUN", "--rank-batch", "-1"], "--rank-batch must be at least 0, got -1"),
    (["sweep", "RUN", "--confidence", "1"], "--confidence must be below 1"),
    (["generate", "RUN", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
])
def test_bad_flags_are_one_line_before_anything_runs(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "out"), "--quiet"]
    one_line(capsys, main(argv), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    code = main(["train", "--device", "cuda", "--out", str(tmp_path / "out"), "--quiet"])
    one_line(capsys, code, "device 'cuda': this machine has no CUDA device")
    assert not (tmp_path / "out").exists()


def test_check_value_types_and_bounds():
    at_least_one = typing.Annotated[int, Range(1)]
    assert check_value(at_least_one, 3, "x") == 3
    for bad, message in [(0, "x must be at least 1, got 0"), (True, "x must be an integer, got True"),
                         (4.7, "x must be an integer, got 4.7"), ("four", "x must be an integer, got 'four'"),
                         (10**23 * 1.0, "x must be an integer")]:
        with pytest.raises(QDyLoRAError, match=message):
            check_value(at_least_one, bad, "x")
    assert check_value(typing.Optional[float], None, "y") is None
    assert check_value(float, "1e-4", "y") == 1e-4
    with pytest.raises(QDyLoRAError, match="y must be a finite number"):
        check_value(float, float("nan"), "y")
    assert check_value(typing.Union[str, list[str]], ("q_proj",), "t") == ["q_proj"]
    with pytest.raises(QDyLoRAError, match="t must be a text or a list of texts, got 5"):
        check_value(typing.Union[str, list[str]], 5, "t")
    with pytest.raises(QDyLoRAError, match="s must be at most 9, got 10"):
        check_value(typing.Annotated[int, Range(0, 9)], 10, "s")


def test_the_choices_the_door_checks_are_the_ones_the_code_knows():
    """The door checks a choice against the field's Literal; the code that acts on it keeps its
    own registry. They must list the same names."""
    from qdylora.core.scaling import RULES as SCALE_RULES
    from qdylora.data.rows import FORMATS
    from qdylora.training.optimizers import OPTIMIZERS
    from qdylora.training.sampling import RULES
    from qdylora.training.settings import ORDERS

    def choices(cls, name):
        tp = typing.get_type_hints(cls)[name]
        return set(typing.get_args(tp))

    assert choices(DataSettings, "format") == set(FORMATS)
    assert choices(TrainSettings, "rank_rule") == set(RULES)
    assert choices(TrainSettings, "optim") == set(OPTIMIZERS)
    assert choices(TrainSettings, "order") == set(ORDERS)
    assert choices(QDyLoRAConfig, "scaling") == set(SCALE_RULES)
