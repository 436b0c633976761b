"""The config core: ConfigError.field as data, typed overrides, finiteness, unions, diffs."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Literal

import pytest

from engramlm.errors import ConfigError
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.presets import get_preset
from engramlm.train.config import OptimConfig, load_train_config
from engramlm.utils.config import apply_overrides, config_diff, from_dict

BASE = ["data.dir=d", "steps=3"]


def _err(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_train_config(None, BASE + overrides)
    return info.value


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("model.overrides.engram.head_dim=0", "model.overrides.engram.head_dim"),
        ("model.overrides.engram.hash.layer_ids=[3,1]", "model.overrides.engram.hash.layer_ids"),
        ("model.overrides.moe.top_k=99", "model.overrides.moe.top_k"),
        ("model.overrides.hidden_size=130", "model.overrides.hidden_size"),
        ("model.overrides.engram.hash.pad_id=99999", "model.overrides.engram.hash.pad_id"),
        ("data.eval_split=dev", "data.eval_split"),
        ("tokens=5", "steps"),
    ],
)
def test_field_is_data_for_nested_fields_and_overrides(override: str, field: str) -> None:
    err = _err([override])
    assert err.field == field
    assert str(err) == f"{field}: {err.message}"


def test_nested_model_dict_errors_carry_field() -> None:
    d = get_preset("tiny").to_dict()
    d["engram"]["hash"]["max_ngram_size"] = 9
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(d)
    assert info.value.field == "engram.hash.max_ngram_size"
    with pytest.raises(ConfigError) as info:
        EngramConfig(head_dim=0)
    assert info.value.field == "engram.head_dim"


@pytest.mark.parametrize("value", ["1e999", "-1e999", "NaN", "Infinity"])
def test_non_finite_lr_refused(value: str) -> None:
    err = _err([f"optim.lr={value}"])
    assert err.field == "optim.lr" and "finite" in err.message


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_floats_refused_at_construction(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        OptimConfig(lr=value)
    assert info.value.field == "optim.lr"
    with pytest.raises(ConfigError) as info:
        OptimConfig(clip=value)
    assert info.value.field == "optim.clip"
    with pytest.raises(ConfigError) as info:
        EngramConfig(gate_norm_eps=value)
    assert info.value.field == "engram.gate_norm_eps"


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("optim.bogus=1", "optim.bogus", "'lr'"),
        ("data.nope.deeper=1", "data.nope", "'batch_size'"),
        ("model.overrides.bogus=1", "model.overrides.bogus", "'hidden_size'"),
        ("nonsense=1", "nonsense", "'optim'"),
    ],
)
def test_unknown_override_key_names_field_and_allowed(override: str, field: str, allowed: str) -> None:
    err = _err([override])
    assert err.field == field
    assert "allowed" in err.message and allowed in err.message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.clip=abc", "optim.clip"),  # float | None
        ("data.max_bytes=1.5", "data.max_bytes"),  # int | None
        ("data.source=5", "data.source"),  # str | None
        ("threads=true", "threads"),  # int | None, a bool is not an int
        ("model.overrides.engram.gate_norm_eps=x", "model.overrides.engram.gate_norm_eps"),
        ("model.overrides.engram.conv_dilation=2.5", "model.overrides.engram.conv_dilation"),
        ("model.overrides.n_kv_heads=[1]", "model.overrides.n_kv_heads"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model.overrides.engram.hash.boundary_mode=eos", "model.overrides.engram.hash.boundary_mode"),
    ],
)
def test_union_and_optional_values_are_validated(override: str, field: str) -> None:
    assert _err([override]).field == field


def test_optional_values_accept_null_and_typed_text() -> None:
    cfg = load_train_config(None, [*BASE, "optim.clip=null", "data.max_bytes=1000", "out_dir=123"])
    assert cfg.optim.clip is None and cfg.data.max_bytes == 1000
    assert cfg.out_dir == "123"  # a str field keeps the override's text
    assert load_train_config(None, [*BASE, "model.overrides.name=42"]).model.resolve().name == "42"
    cfg = load_train_config(None, [*BASE, "model.overrides.engram.conv_dilation=2"])
    assert cfg.model.resolve().engram.conv_dilation == 2


@dataclass(frozen=True)
class _Multi:
    x: int | str = 0
    mode: Literal["a", "b"] = "a"


def test_multi_arm_union_and_literal() -> None:
    assert from_dict(_Multi, {"x": "s"}).x == "s" and from_dict(_Multi, {"x": 2}).x == 2
    with pytest.raises(ConfigError) as info:
        from_dict(_Multi, {"x": 1.5}, "top")
    assert info.value.field == "top.x" and "int | str" in info.value.message
    with pytest.raises(ConfigError) as info:
        from_dict(_Multi, {"mode": "c"})
    assert info.value.field == "mode"


def test_under_moves_the_path_as_data() -> None:
    err = ConfigError("must be > 0", "engram.head_dim")
    assert err.under("model.overrides.engram", "engram").field == "model.overrides.engram.head_dim"
    assert err.under("model.overrides").field == "model.overrides.engram.head_dim"
    assert ConfigError("bad").under("x").field == "x"
    assert ConfigError("plain message").field is None and str(ConfigError("plain message")) == "plain message"
    back = pickle.loads(pickle.dumps(err))
    assert back.field == err.field and str(back) == str(err)


def test_apply_overrides_without_schema_and_diff() -> None:
    out = apply_overrides({"a": {"b": 1}}, ["a.c=[1,2]", "d=text"])
    assert out == {"a": {"b": 1, "c": [1, 2]}, "d": "text"}
    assert config_diff({"a": {"b": 1, "c": 2}, "x": 1}, {"a": {"b": 1, "c": 3}, "y": 1}) == ["a.c", "x", "y"]
