"""Config: YAML presets, strict dotted overrides, closest-key hints, type checks, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hvae.config import Config, ConfigError, all_keys, apply, from_dict, load_yaml, parse_set, to_dict


def test_all_keys_lists_every_field_of_every_section():
    keys = all_keys()
    for section in ("model", "data", "train"):
        fields = dataclasses.fields(getattr(Config(), section))
        assert {f"{section}.{f.name}" for f in fields} <= set(keys)
    assert len(keys) == len(set(keys))


def test_yaml_preset_lists_only_what_differs(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("model:\n  latent_dim: 8\n  hidden: [64, 32]\ndata:\n  validation: 100\ntrain:\n  lr: 3e-4\n"
                    "  analytic_kl: false\n  beta: 2\n")
    cfg = apply(Config(), load_yaml(path))
    assert cfg.model.latent_dim == 8 and cfg.model.hidden == [64, 32] and cfg.data.validation == 100
    assert cfg.optim.lr == 3e-4 and cfg.objective.analytic_kl is False
    assert cfg.objective.beta == 2.0 and isinstance(cfg.objective.beta, float)  # ints are accepted for floats
    assert cfg.train.epochs == Config().train.epochs  # everything else stays at its default


def test_empty_file_and_empty_sections_change_nothing(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "sections.yaml").write_text("model:\ndata:\ntrain:\n")
    for name in ("empty.yaml", "sections.yaml"):
        assert apply(Config(), load_yaml(tmp_path / name)) == Config()


@pytest.mark.parametrize("item, key, value", [
    ("optim.lr=3e-4", "optim.lr", 3e-4),  # YAML 1.1 reads '3e-4' as a string; floats must still take it
    ("optim.lr=1E-3", "optim.lr", 1e-3),
    ("optim.lr=0.5", "optim.lr", 0.5),
    ("train.epochs=7", "train.epochs", 7),
    ("model.hidden=[256,128]", "model.hidden", [256, 128]),
    ("model.hidden=[]", "model.hidden", []),
    ("runtime.compile=true", "runtime.compile", True),
    ("data.data_dir=/tmp/x", "data.data_dir", "/tmp/x"),
    ("data.data_dir=null", "data.data_dir", None),
    ("data.data_dir=", "data.data_dir", None),
    ("data.dataset=data/my.npz", "data.dataset", "data/my.npz"),
    ("model.name='vae'", "model.name", "vae"),
])
def test_set_overrides(item, key, value):
    cfg = apply(Config(), parse_set([item]))
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("key, closest", [
    ("train.lrr", "optim.lr"),
    ("trian.lr", "optim.lr"),
    ("model.latentdim", "model.latent_dim"),
    ("model.hiden", "model.hidden"),
    ("data.data-dir", "data.data_dir"),
    ("lr", "optim.lr"),  # a top-level key that belongs in a section
    ("batch_size", "train.batch_size"),
    ("Train.Epochs", "train.epochs"),
])
def test_unknown_key_names_the_closest_valid_key(key, closest):
    with pytest.raises(ConfigError) as err:
        apply(Config(), {key: 1})
    msg = str(err.value)
    assert "unknown config key" in msg and f"did you mean {closest!r}" in msg


def test_a_section_alone_is_not_a_key():
    with pytest.raises(ConfigError, match="'model' is a section"):
        apply(Config(), parse_set(["model=5"]))


def test_unknown_keys_in_yaml_top_level_and_nested(tmp_path):
    cases = {"top.yaml": ("lr: 0.1\n", "optim.lr"), "nested.yaml": ("train:\n  lerning_rate: 0.1\n", None),
             "misspelt.yaml": ("train:\n  warmup_epoch: 2\n", "objective.warmup_epochs"),
             "section.yaml": ("trian:\n  lr: 0.1\n", "optim.lr")}
    for name, (text, closest) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            apply(Config(), load_yaml(tmp_path / name))
        assert "unknown config key" in str(err.value)
        if closest:
            assert repr(closest) in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("train.epochs", "ten"),  # string for int
    ("train.epochs", True),  # bool for int
    ("train.epochs", 2.0),  # float for int
    ("train.epochs", None),
    ("model.hidden", ["a", "b"]),  # list of strings for list[int]
    ("model.hidden", [1.5, 2]),
    ("model.hidden", [True]),
    ("model.hidden", 64),
    ("model.hidden", {"a": 1}),
    ("optim.lr", True),
    ("optim.lr", "fast"),
    ("optim.lr", float("nan")),
    ("optim.lr", float("inf")),
    ("optim.lr", 10 ** 400),
    ("runtime.compile", 1),  # int for bool
    ("runtime.compile", "yes please"),
    ("model.name", 5),
    ("model.name", None),
    ("data.data_dir", [1]),
])
def test_wrong_types_are_refused_with_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        apply(Config(), {key: value})
    assert repr(key) in str(err.value)


@pytest.mark.parametrize("items", [["optim.lr"], ["=3"], ["optim.lr=[1,"], ["optim.lr=2020-13-45"],
                                   ["optim.lr={a: [}"], ["model.hidden=[1, 2"]])
def test_parse_set_refuses_malformed_items(items):
    with pytest.raises(ConfigError) as err:
        apply(Config(), parse_set(items))
    assert "\n" not in str(err.value)


def test_bad_yaml_files(tmp_path):
    (tmp_path / "syntax.yaml").write_text("train:\n  lr: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "scalar.yaml").write_text("just words\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    (tmp_path / "tabs.yaml").write_text("train:\n\tlr: 1\n")
    (tmp_path / "date.yaml").write_text("train:\n  lr: 2020-13-45\n")
    (tmp_path / "dir.yaml").mkdir()
    for name, fragment in (("syntax.yaml", "not valid YAML"), ("list.yaml", "mapping"), ("scalar.yaml", "mapping"),
                           ("binary.yaml", "UTF-8"), ("tabs.yaml", "not valid YAML"), ("date.yaml", "not valid YAML"),
                           ("dir.yaml", "cannot read"), ("missing.yaml", "cannot read")):
        with pytest.raises(ConfigError, match=fragment) as err:
            load_yaml(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_round_trip_to_dict_from_dict_and_through_json():
    cfg = apply(Config(), {"model.hidden": [16, 8], "model.latent_dim": 3, "data.data_dir": "/d", "optim.lr": 2e-4,
                           "runtime.compile": True, "objective.beta": 0.5})
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert from_dict(to_dict(Config())) == Config()
    assert from_dict({}) == Config()  # an older config.json lacking keys gets today's defaults


def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown config key 'train.from_the_future'"):
        from_dict({"train": {"from_the_future": 1}})
    with pytest.raises(ConfigError, match="mapping"):
        from_dict([1, 2])
    with pytest.raises(ConfigError, match="must be int"):
        from_dict({"model": {"latent_dim": "3"}})


def test_apply_returns_a_copy_and_shares_no_lists():
    base = Config()
    cfg = apply(base, {"optim.lr": 0.5})
    assert base.optim.lr == Config().optim.lr and cfg.optim.lr == 0.5
    cfg.model.hidden.append(7)
    assert base.model.hidden == Config().model.hidden


def test_a_key_given_twice_in_a_yaml_preset_is_an_error_not_a_silent_drop(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 3.0e-4\n  epochs: 5\ntrain:\n  epochs: 7\n")
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_yaml(preset)
    preset.write_text("model:\n  hidden: [64]\n  hidden: [128]\n")
    with pytest.raises(ConfigError, match="'hidden' is given twice"):
        load_yaml(preset)


@pytest.mark.parametrize("item", ["train.epochs=010", "optim.lr=1:30"])
def test_yaml_1_1_octal_and_base_60_numbers_are_not_read_as_numbers(item):
    """YAML 1.1 reads 010 as 8 and 1:30 as 90; here they stay text, which the typed config refuses."""
    with pytest.raises(ConfigError, match="must be"):
        apply(Config(), parse_set([item]))
    assert parse_set(["train.epochs=10", "x=0x1F", "y=-5"]) == {"train.epochs": 10, "x": 31, "y": -5}


def test_every_shipped_preset_loads_and_builds_its_model():
    """configs/*.yaml: each is a valid config of the current schema, and its model builds for Fashion-MNIST."""
    from pathlib import Path

    from hvae.models import build_model

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(presets) >= 10
    for path in presets:
        cfg = apply(Config(), load_yaml(path))
        assert build_model(cfg.model, (1, 28, 28)) is not None, path.name
