"""Sources are built from a registry keyed by the config's `type:`; every entry's sample block is a
valid config block, and a source whose kind of data has no model fails at start-up naming the source."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from daemon.cli_support import UsageError
from daemon.commands.run import build_sources
from daemon.config import SOURCE_TYPES, Source, parse_config
from daemon.models import load_models
from daemon.sources import REGISTRY, BuildContext, build_source, kind_of, secret
from ingest.source import Source as SourceProtocol


def test_every_config_type_has_a_builder_and_a_sample_block_that_loads() -> None:
    union = typing.get_args(typing.get_args(Source)[0])
    literal_types = {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in union}
    assert set(REGISTRY) == set(SOURCE_TYPES) == literal_types
    for name, entry in REGISTRY.items():
        block = entry.sample_block()
        assert block["type"] == name
        config = parse_config({"sources": [block], "model": {"path": "models/m"}}, origin=f"sample {name}")
        assert kind_of(config.sources[0]) == entry.kind
    # the YAML text itself, as a person would paste it under `sources:`
    text = "sources:\n" + "".join(
        "  - " + "\n    ".join(e.sample.strip().splitlines()) + "\n" for e in REGISTRY.values()
    )
    assert len(yaml.safe_load(text)["sources"]) == len(REGISTRY)


def test_built_sources_have_the_one_source_shape(
    tmp_path: Path, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    from daemon.cli import main
    from flows.artifact import load_model

    cell, model = tiny_cell_and_model
    folder = tmp_path / "incoming"
    folder.mkdir()
    bus = tmp_path / "bus.pcapng"
    argv = ["synth", "--out", str(tmp_path / "small.parquet"), "--cycles", "3", "--pcap", str(bus)]
    assert main([*argv, "--bus-hz", "100", "--pcap-copies", "1"]) == 0
    blocks = [
        {"type": "voraus_replay", "robot": "r1", "path": str(cell)},
        {"type": "image_folder", "robot": "r1", "path": str(folder)},
        {"type": "mqtt", "host": "localhost"},
        {"type": "kafka", "bootstrap": ["localhost:9092"], "topic": "t"},
        {"type": "mqtt_frames", "host": "localhost"},
        {"type": "kafka_frames", "bootstrap": ["localhost:9092"]},
        {"type": "video", "url": "rtsp://127.0.0.1:1/none", "robot": "r1", "camera": "cam2"},
        {"type": "ethercat", "capture": str(bus), "map": str(bus.with_name("bus.map.yaml")), "robot": "r2"},
    ]
    config = parse_config({"sources": blocks, "model": {"path": "m"}})
    card = load_model(model).card
    ctx = BuildContext(signals=list(card.signals), secret=secret, rate_hz=card.rate_hz * 10)
    for src in config.sources:
        source = build_source(src, ctx)
        try:
            assert isinstance(source, SourceProtocol), src.type
            assert source.kind == REGISTRY[src.type].kind
            assert source.name
        finally:
            source.close()


def test_a_camera_source_without_an_image_model_fails_at_start_naming_it(
    tmp_path: Path, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    cell, model = tiny_cell_and_model
    folder = tmp_path / "incoming"
    folder.mkdir()
    config = parse_config(
        {
            "sources": [
                {"type": "voraus_replay", "robot": "r1", "path": str(cell)},
                {"type": "image_folder", "robot": "r1", "path": str(folder)},
            ],
            "model": {"path": str(model)},
        }
    )
    models, _ = load_models(config)
    with pytest.raises(UsageError, match=r"sources\[1\] \(image_folder\) needs an AST"):
        build_sources(config, models)


def test_two_models_of_one_kind_are_refused_naming_both(tiny_cell_and_model: tuple[Path, Path]) -> None:
    _, model = tiny_cell_and_model
    config = parse_config(
        {
            "sources": [{"type": "mqtt", "host": "localhost"}],
            "models": [{"path": str(model)}, {"path": str(model)}],
        }
    )
    with pytest.raises(ValueError, match=r"models\[1\]\.path: .* is a second 'mvt-flow' model"):
        load_models(config)


def test_config_errors_name_the_camera_field_and_value() -> None:
    from daemon.config import ConfigError

    with pytest.raises(ConfigError, match=r"sources\[0\]\.topic: .*\{robot\} and \{camera\}"):
        parse_config(
            {"sources": [{"type": "mqtt_frames", "host": "h", "topic": "cell/x"}], "model": {"path": "m"}}
        )
    with pytest.raises(ConfigError, match=r"sources\[0\]\.max_fps: .*greater than 0"):
        parse_config(
            {
                "sources": [{"type": "video", "url": "a.mp4", "robot": "r", "max_fps": 0}],
                "model": {"path": "m"},
            }
        )
    with pytest.raises(ConfigError, match=r"cycle_pattern"):
        parse_config(
            {
                "sources": [{"type": "image_folder", "path": "p", "robot": "r", "cycle_pattern": "(x"}],
                "model": {"path": "m"},
            }
        )
    with pytest.raises(ConfigError, match=r"give `model` or `models`, not both"):
        parse_config(
            {"sources": [{"type": "mqtt", "host": "h"}], "model": {"path": "m"}, "models": [{"path": "n"}]}
        )
