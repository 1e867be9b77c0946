"""Shared pydantic configuration for every API model.

Kubernetes-facing fields are camelCase on the wire and snake_case in Python; unknown
fields are rejected so that a typo in a manifest is an error, not a silent default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base for API models: camelCase aliases, strict about unknown fields, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        """The JSON-compatible form as it appears in manifests and plan files."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
