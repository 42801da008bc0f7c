"""Configuration: one place reads the environment, and example.env documents all of it."""

from __future__ import annotations

import re

import pytest

from shared.config import ConfigError, Settings, env_names
from tests.support import ROOT


def test_example_env_documents_every_variable() -> None:
    text = (ROOT / "example.env").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert set(env_names().values()) <= documented
    # And nothing in example.env that the code does not read (except make run's ports).
    assert documented - set(env_names().values()) <= {"REDIS_PORT", "MONGO_PORT"}


def test_example_env_values_parse_to_the_defaults() -> None:
    values = dict(
        re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", (ROOT / "example.env").read_text(), flags=re.M)
    )
    parsed = Settings.from_env(values, node_id="n1")
    defaults = Settings(node_id="n1")
    assert parsed == defaults


def test_only_config_reads_the_environment() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("gateway", "worker", "shared")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "config.py" and re.search(r"os\.environ|getenv", path.read_text())
    ]
    assert offenders == []


def test_bad_values_are_refused_with_the_variable_name() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_PORT"):
        Settings.from_env({"GATEWAY_PORT": "http"})
    with pytest.raises(ConfigError, match="PARTITIONS"):
        Settings.from_env({"PARTITIONS": "0"})
    with pytest.raises(ConfigError, match="AUTH_CACHE_KEEP_SECONDS"):
        Settings.from_env({"AUTH_CACHE_KEEP_SECONDS": "-1"})
    assert Settings.from_env({"WEBSOCKET_COMPRESSION": "yes"}).websocket_compression is True
    assert Settings.from_env({"MONGO_URL": "mongodb://h:1/other"}).mongo_database == "other"


def test_node_id_is_unique_per_settings() -> None:
    assert Settings().node_id != Settings().node_id
