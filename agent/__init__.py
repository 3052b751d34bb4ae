"""The cv-worker daemon: config, durable state, MQTT job protocol, job engine and CLI."""

from pathlib import Path

__version__ = (Path(__file__).with_name("VERSION")).read_text().strip()
