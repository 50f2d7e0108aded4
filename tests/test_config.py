from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from loraleak.config import ExistingPath, from_dict, load_yaml, to_dict
from loraleak.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rank: int = 4
    targets: tuple[str, ...] = ("to_q", "to_v")


@dataclass(frozen=True)
class Outer:
    name: str
    lr: float = 1e-4
    kind: Literal["a", "b"] = "a"
    data: ExistingPath | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


def test_valid_nested_config_and_roundtrip(tmp_path):
    cfg = from_dict(Outer, {"name": "x", "lr": "2e-4", "data": str(tmp_path),
                            "inner": {"rank": 8, "targets": ["to_k"]}})
    assert cfg.lr == 2e-4 and cfg.inner == Inner(8, ("to_k",)) and cfg.data == tmp_path
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "rnak": 3}, "unknown key 'rnak'"),
    ({"name": "x", "inner": {"rank": "big"}}, "config.inner.rank: expected an integer"),
    ({"name": "x", "inner": {"rank": True}}, "expected an integer"),
    ({"lr": 0.1}, "missing required key 'name'"),
    ({"name": "x", "kind": "c"}, "is not one of 'a', 'b'"),
    ({"name": "x", "data": "/no/such/dir"}, "path does not exist: /no/such/dir"),
    ({"name": "x", "lr": -1.0}, "lr must be > 0"),
    ({"name": "x", "inner": {"targets": "to_q"}}, "expected a list"),
])
def test_bad_config_is_one_clear_error(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@dataclass(frozen=True)
class Precision:
    mixed_precision: Literal["no", "bf16"] = "bf16"
    switch: Literal["on", "off", "auto"] = "auto"
    flag: Literal[True, "no"] = True


def test_yaml_bool_words_are_the_literal_strings_they_spell(tmp_path):
    # YAML 1.1 reads an unquoted `no` as False: `--set attack.mixed_precision=no` must mean "no".
    path = tmp_path / "p.yaml"
    path.write_text("mixed_precision: no\nswitch: off\nflag: no\n")
    assert load_yaml(Precision, path) == Precision("no", "off", "no")
    path.write_text("switch: on\nflag: yes\n")
    assert load_yaml(Precision, path) == Precision(switch="on", flag=True)
    with pytest.raises(ConfigError, match="True is not one of 'no', 'bf16'"):
        from_dict(Precision, {"mixed_precision": True})


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Outer, bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: run\ninner:\n  rank: 16\n")
    assert load_yaml(Outer, good, {"lr": 0.5}) == Outer("run", 0.5, inner=Inner(16))
