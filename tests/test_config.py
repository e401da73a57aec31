"""Config validation: unknown keys and bad values stop with a message naming the key."""

from pathlib import Path

import pytest

from polca.config import ConfigError, dump_config, load_config, parse_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    copy = tmp_path / "config.toml"
    copy.write_text(dump_config(cfg))
    assert load_config(copy) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key"):
        parse_config({"name": "x", "train": {"stpes": 10}})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        parse_config({"name": "x", "train": {"lr": -1}})
    with pytest.raises(ConfigError, match="divisible"):
        parse_config({"name": "x", "model": {"d_model": 10, "n_heads": 4}})
    with pytest.raises(ConfigError, match="one checkpoint schedule"):
        parse_config({"name": "x", "checkpoints": {"every": 5, "log_spaced": 10}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_checkpoint_window_must_lie_within_training():
    cfg = parse_config({"name": "x", "train": {"steps": 100},
                        "checkpoints": {"every": 10, "start": 50}})
    assert cfg.checkpoints.start == 50
    with pytest.raises(ConfigError, match=r"checkpoints.start \(100\) must be below train.steps"):
        parse_config({"name": "x", "train": {"steps": 100}, "checkpoints": {"start": 100}})
    with pytest.raises(ConfigError, match=r"checkpoints.steps \[20\] lie outside"):
        parse_config({"name": "x", "train": {"steps": 100},
                      "checkpoints": {"steps": [20, 60], "start": 50}})
