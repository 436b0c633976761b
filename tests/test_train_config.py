"""TrainConfig: TOML/YAML loading, dotted overrides, validation naming the field path, schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from engramlm.errors import ConfigError
from engramlm.train.config import TrainConfig, load_train_config, parse_value
from engramlm.train.schedule import lr_multiplier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TOML = """
steps = 50
seed = 3
[data]
dir = "prep"
batch_size = 4
seq_len = 32
[model]
preset = "tiny"
[model.overrides]
hidden_size = 128
"engram.hash.layer_ids" = [1, 2]
[optim]
lr = 0.002
[schedule]
warmup_steps = 5
"""

YAML = """
tokens: 10000
data: {dir: prep, batch_size: 4, seq_len: 50}
model:
  preset: tiny
  drop: [engram]
optim: {lr: 1.0e-3, clip: null}
"""


def test_toml_with_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(TOML)
    cfg = load_train_config(p, ["optim.lr=1e-3", "data.batch_size=8", "model.overrides.engram.head_dim=16"])
    assert cfg.optim.lr == 1e-3 and cfg.data.batch_size == 8 and cfg.seed == 3
    m = cfg.model.resolve()
    assert m.hidden_size == 128 and m.engram.hash.layer_ids == (1, 2) and m.engram.head_dim == 16
    assert cfg.optim.engram_lr_mult == 5.0 and cfg.optim.engram_weight_decay == 0.0  # the paper's recipe
    assert cfg.total_steps == 50 and cfg.tokens_per_step == 8 * 32
    # round trip through the JSON form stored in checkpoints
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_token_budget_and_drop(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    cfg = load_train_config(p)
    assert cfg.total_steps == -(-10000 // (4 * 50)) and cfg.optim.clip is None
    assert cfg.model.resolve().engram is None


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.eval_split=dev", "data.eval_split"),
        ("schedule.milestones=[0.9,0.5]", "schedule.milestones"),
        ("model.overrides.hidden_size=130", "model.overrides.hidden_size"),
        ("model.overrides.moe.top_k=99", "model.overrides.moe.top_k"),
        ("model.preset=nope", "model.preset"),
        ("optim.bogus=1", "optim"),
        ("tokens=100", "steps"),  # both steps and tokens
        ("checkpoint_every=0", "checkpoint_every"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, override: str, field: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(TOML)
    with pytest.raises(ConfigError) as err:
        load_train_config(p, [override])
    assert str(err.value).startswith(field), str(err.value)


def test_missing_data_section_and_bad_override() -> None:
    with pytest.raises(ConfigError, match=r"^data"):
        load_train_config(None, ["steps=3"])
    with pytest.raises(ConfigError, match=r"key=value"):
        load_train_config(None, ["data.dir"])
    with pytest.raises(ConfigError, match=r"^steps: is a value"):
        load_train_config(None, ["steps=3", "steps.x=1", "data.dir=d"])


def test_parse_value() -> None:
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2]
    assert parse_value("true") is True and parse_value("None") is None and parse_value("runs/x") == "runs/x"


def test_schedule_warmup_then_step_decay() -> None:
    cfg = load_train_config(None, ["data.dir=d", "steps=100", "schedule.warmup_steps=10"]).schedule
    mults = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == 1.0 and mults[79] == 1.0
    assert mults[80] == pytest.approx(0.316) and mults[89] == pytest.approx(0.316)
    assert mults[90] == pytest.approx(0.316**2) and mults[99] == pytest.approx(0.316**2)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_train_config(path)
    assert cfg.model.resolve() is not None
