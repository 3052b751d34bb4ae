"""The protocol docs and JSON Schemas in the repo are exactly what the code generates."""

from __future__ import annotations

import json

from agent.cli import schema_file_name
from agent.docs_gen import all_schemas, config_markdown, protocol_markdown
from tests.agent_proc import REPO


def test_protocol_md_is_generated_from_the_models():
    assert (REPO / "docs" / "protocol.md").read_text() == protocol_markdown() + "\n", "run `make docs`"


def test_configuration_md_is_generated_from_the_config_model():
    assert (REPO / "docs" / "configuration.md").read_text() == config_markdown() + "\n", "run `make docs`"


def test_schema_files_match():
    for name, schema in all_schemas().items():
        path = REPO / "docs" / "schemas" / schema_file_name(name)
        assert json.loads(path.read_text()) == schema, f"{path} is stale: run `make docs`"


def test_readme_links_protocol():
    readme = (REPO / "README.md").read_text()
    assert "docs/protocol.md" in readme and "make demo" in readme and "make test" in readme
