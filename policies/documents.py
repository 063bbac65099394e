"""What the project's versioned YAML documents (the placement policy, the model catalog) share: the API version,
strict models, and reading a file into a top-level mapping with errors that name the document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

API_VERSION = "gpu-extender.io/v1alpha1"


class StrictModel(BaseModel):
    # A typo in a document must be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def read_text(path: str | Path, error: type[ValueError]) -> str:
    """The file's text, or `error` saying the file cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from exc


def yaml_mapping(
    text: str, origin: str, error: type[ValueError], what: str = "a mapping", empty: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The document's top-level mapping; `empty` stands in for an empty document where one is allowed."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{origin}: not valid YAML: {exc}") from exc
    if document is None and empty is not None:
        return empty
    if not isinstance(document, dict):
        got = "an empty document" if document is None else type(document).__name__
        raise error(f"{origin}: expected {what} at the top level, got {got}")
    return document
