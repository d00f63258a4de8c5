"""The daemon config: every sample loads, bad values fail naming field and value, secrets stay secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, load_config, parse_config, resolve_secrets

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
BASE = {
    "sources": [{"type": "voraus_replay", "robot": "r1", "path": "cell.parquet"}],
    "model": {"path": "model"},
}


def with_(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_sample_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.sources
    assert config.model_list
    assert all(m.path.is_absolute() for m in config.model_list)


def test_there_are_samples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_(sources__0__speed=-1), "sources[0].speed: Input should be greater than 0 (got -1)"),
        (with_(scoring__batch=0), "scoring.batch: Input should be greater than or equal to 1 (got 0)"),
        (with_(scoring__device="tpu"), "scoring.device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
        (with_(alerts__k=4, alerts__n=3), "alerts: k (4) must not exceed n (3)"),
        (with_(sinks__influxdb={"url": "http://x:8086", "api": "v2"}), "api v2 needs org, bucket and token"),
        (with_(sinks__influxdb={"url": "x:8086"}), "sinks.influxdb.url: String should match pattern"),
        (with_(scoring__batchsize=3), "scoring.batchsize: Extra inputs are not permitted (got 3)"),
        (with_(sources__0__type="amqp"), "sources[0]: Input tag 'amqp' found using 'type' does not match"),
        ({"sources": [BASE["sources"][0], BASE["sources"][0]], "model": BASE["model"]}, "repeated: ['r1']"),
        ({"model": BASE["model"]}, "sources: Field required"),
        (
            with_(sources=[{"type": "mqtt", "host": "h", "topic": "cell/signals"}]),
            "sources[0].topic: String should match pattern",
        ),
        (
            with_(sources=[{"type": "mqtt", "host": "h", "topic": "cell/+/+/signals"}]),
            "topic needs exactly one '+' level, the robot id (got 'cell/+/+/signals')",
        ),
        (
            with_(sources=[{"type": "kafka", "bootstrap": ["kafka"], "topic": "t"}]),
            "sources[0].bootstrap[0]: String should match pattern",
        ),
        (
            with_(
                sources=[
                    {
                        "type": "kafka",
                        "bootstrap": ["k:9092"],
                        "topic": "t",
                        "security": {"protocol": "SASL_SSL"},
                    }
                ]
            ),
            "sources[0].security: protocol SASL_SSL needs username and password",
        ),
        (
            with_(sinks__mqtt={"host": "h", "score_topic": "cell/anomaly"}),
            "sinks.mqtt.score_topic: String should match pattern",
        ),
    ],
)
def test_bad_values_name_the_field_and_value(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_relative_paths_are_relative_to_the_config_and_file_sink_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "c.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path)
    assert config.sources[0].path == path.parent.resolve() / "cell.parquet"
    assert config.sinks.influxdb is None
    assert config.sinks.file is not None  # embedded default: scores go to a local file
    assert config.sinks.file.path == path.parent.resolve() / "scores.jsonl"


def test_secrets_come_from_files_or_environment_and_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "influx-password").write_text("hunter2\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("INFLUX_TOKEN", "tok-123")
    data = with_(
        sinks__influxdb={
            "url": "http://127.0.0.1:8086",
            "password": {"file": "influx-password"},
            "token": {"env": "INFLUX_TOKEN"},
        }
    )
    config = parse_config(data)
    assert config.sinks.influxdb is not None
    password, token = resolve_secrets(config.sinks.influxdb)
    assert password is not None
    assert token is not None
    assert password.get_secret_value() == "hunter2"
    assert token.get_secret_value() == "tok-123"
    for text in (repr(password), str(password), repr(config)):
        assert "hunter2" not in text
        assert "tok-123" not in text
    monkeypatch.delenv("INFLUX_TOKEN")
    with pytest.raises(ConfigError, match=r"INFLUX_TOKEN .* is not set"):
        resolve_secrets(config.sinks.influxdb)
    with pytest.raises(ConfigError, match="exactly one of 'file' or 'env'"):
        parse_config(with_(sinks__influxdb={"url": "http://x", "password": {"file": "a", "env": "B"}}))


def test_a_secret_written_inline_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_(sinks__influxdb={"url": "http://x", "password": "hunter2"}))
    assert "sinks.influxdb.password" in str(err.value)
    assert "hunter2" not in str(err.value)
