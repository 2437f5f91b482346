"""Typed config: YAML + overrides, unknown keys listed, types, choices and ranges checked, recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest

from seechat.config import ConfigError, RunConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p
    for p in [
        *ROOT.joinpath("configs").rglob("*.yaml"),
        *ROOT.joinpath("seechat", "mini", "recipes").glob("*.yaml"),
    ]
    if "accelerate" not in p.parts
)  # launcher configs: tests/test_accelerate_configs.py; the mini recipes ship in the package


def test_overrides_apply_and_types_coerce(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\ntrain:\n  max_steps: 5\n")
    cfg = load_config(p, ["optim.lr=2e-4", "model.bridge.type=qformer", "data.paths=[a.tar, b.tar]"])
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.train.max_steps == 5
    assert cfg.model.bridge.type == "qformer" and cfg.data.paths == ("a.tar", "b.tar")


def test_unknown_key_lists_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) optim.learning_rate; valid keys under optim: lr"
    ):
        load_config(None, ["optim.learning_rate=1"])


def test_a_bare_no_is_the_choice_no_not_yaml_false(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {mixed_precision: no}\n")
    assert load_config(recipe).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: True is not one of"):
        load_config(None, ["train.mixed_precision=yes"])


def test_bad_choice_and_type_are_errors():
    with pytest.raises(ConfigError, match="model.bridge.type: 'transformer' is not one of"):
        load_config(None, ["model.bridge.type=transformer"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", "train.batch_size: 0 is out of range; it must be >= 1"),
        ("train.log_every=0", "train.log_every: 0 is out of range; it must be >= 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every: 0 is out of range; it must be >= 1"),
        ("train.save_every=-1", "train.save_every: -1 is out of range; it must be >= 0"),
        ("optim.lr=0", "optim.lr: 0.0 is out of range; it must be > 0"),
        ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio: 1.5 is out of range; it must be in \[0, 1\]"),
        ("optim.betas=[0.9,1]", r"optim.betas\[1\]: 1.0 is out of range; it must be in \[0, 1\)"),
        ("trainable.lora.dropout=1", r"trainable.lora.dropout: 1.0 is out of range; it must be in \[0, 1\)"),
        ("model.bridge.num_queries=0", "model.bridge.num_queries: 0 is out of range"),
        ("data.num_workers=-2", "data.num_workers: -2 is out of range; it must be >= 0"),
    ],
)
def test_numbers_out_of_range_are_refused_when_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_numbers_at_the_edges_of_their_ranges_are_taken():
    cfg = load_config(
        None,
        ["train.batch_size=1", "train.save_every=0", "optim.min_lr_ratio=1", "optim.betas=[0, 0.99]"],
    )
    assert (cfg.train.batch_size, cfg.train.save_every, cfg.optim.min_lr_ratio) == (1, 0, 1.0)
    assert cfg.optim.betas == (0.0, 0.99)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.train.max_steps = 3  # type: ignore[misc]


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.bridge.num_queries=16"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    load_config(path)
