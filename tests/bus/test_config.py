"""The configuration file: defaults, every setting, and one clear line for each kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from vfiod import config
from vfiod.config import Config, ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vfiod.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = load(None)
    assert cfg == Config()
    assert cfg.persistence_units == {"10de": ["nvidia-persistenced.service"]}
    assert cfg.deadlines.policy().for_driver("nvidia") == 60.0
    assert (cfg.per_caller.max_calls_in_flight, cfg.per_caller.max_queued_reply_bytes) == (
        32,
        16 * 1024 * 1024,
    )
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_every_setting(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            """
register_allow = ["0000:41:00.0", "15B3:101D"]
[persistence_units]
"0x10DE" = ["nvidia-persistenced.service", "nvidia-fabricmanager.service"]
"1002" = []
[deadlines]
default = 20
[deadlines.drivers]
nvidia = 90
mlx5_core = 5
[per_caller]
max_calls_in_flight = 8
max_queued_reply_bytes = 1048576
""",
        )
    )
    assert cfg.register_allow == ["0000:41:00.0", "15b3:101d"]
    # vendor by vendor: AMD's entry alone keeps NVIDIA's default
    assert load(write(tmp_path, '[persistence_units]\n"1002" = ["x.service"]\n')).persistence_units == {
        "10de": ["nvidia-persistenced.service"],
        "1002": ["x.service"],
    }
    assert cfg.persistence_units == {
        "10de": ["nvidia-persistenced.service", "nvidia-fabricmanager.service"],
        "1002": [],
    }
    policy = cfg.deadlines.policy()
    assert policy.default == 20 and policy.for_driver("nvidia") == 90
    assert policy.for_driver("mlx5_core") == 20  # never below the default
    assert policy.for_driver("i915") == 30  # the built-in slow drivers stay
    assert (cfg.per_caller.max_calls_in_flight, cfg.per_caller.max_queued_reply_bytes) == (8, 1048576)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("register_allow = ['41:00.0']", "register_allow.0: '41:00.0' is neither a PCI address"),
        ("[persistence_units]\nnvidia = ['x.service']", "persistence_units.nvidia"),
        ("[persistence_units]\n'10de' = ['not a unit']", "is not a systemd unit name"),
        ("[metrics]\ntextfile = 'vfiod.prom'", "is not an absolute path ending in .prom"),
        ("[metrics]\ntextfile = '/var/lib/x/vfiod.txt'", "is not an absolute path ending in .prom"),
        ("[metrics]\ninterval = 0", "metrics.interval: Input should be greater than or equal to 1"),
        ("[deadlines]\ndefault = 0", "deadlines.default: Input should be greater than 0"),
        ("[deadlines.drivers]\n'bad/driver' = 3", "is not a kernel driver name"),
        ("colour = 'blue'", "colour: unknown setting"),
        ("[deadlines]\ndefault = 'soon'", "deadlines.default: Input should be a valid number"),
        ("register_allow = [", "not valid TOML"),
        ("[per_caller]\nmax_calls_in_flight = 0", "per_caller.max_calls_in_flight: Input should be greater"),
        ("[per_caller]\nmax_queued_reply_bytes = 100", "per_caller.max_queued_reply_bytes: Input should be"),
        ("register_allow = [1, 2]", "register_allow.0: Input should be a valid string (and 1 more problem)"),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_shipped_example_documents_every_key_and_loads(tmp_path: Path) -> None:
    """packaging/examples/vfiod.toml.example (installed under /usr/share/doc/vfiod/examples/): every key of
    the schema appears in it, and with its settings uncommented it is a valid configuration."""
    example = Path(__file__).resolve().parents[2] / "packaging/examples/vfiod.toml.example"
    text = example.read_text(encoding="utf-8")
    keys = set(Config.model_fields)
    for info in Config.model_fields.values():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= set(annotation.model_fields)
    missing = sorted(k for k in keys if k not in text)
    assert not missing, f"the example does not mention {missing}"
    settings = [
        line[1:]
        for line in text.splitlines()
        if line.startswith("#") and line[1:2] not in (" ", "") and not line.startswith("#!")
    ]
    path = tmp_path / "vfiod.toml"
    path.write_text("\n".join(settings) + "\n", encoding="utf-8")
    loaded = load(path)
    assert loaded.vgpu_orphan_grace == 300 and loaded.deadlines.drivers == {"nvidia": 90}
    assert loaded.register_allow == ["0000:41:00.0", "15b3:101d"]
