"""Reading MoEJob manifests and cluster descriptions from YAML files.

Every failure becomes a :class:`UserError` naming the file and the field, because
these files are typed by people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import MoEJob
from hetmoe_operator.errors import UserError, describe_validation_error


def read_yaml(path: Path) -> Any:
    """Parse one YAML document; missing files and syntax errors become UserErrors."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None


def _mapping(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping at the top level")
    return data


def load_job(path: Path) -> MoEJob:
    """A MoEJob manifest from ``path``."""
    try:
        return MoEJob.model_validate(_mapping(path))
    except ValidationError as error:
        raise UserError(describe_validation_error(error, str(path))) from None


def load_catalog(path: Path) -> DeviceCatalog:
    """A device catalog from ``path``."""
    try:
        return DeviceCatalog.model_validate(_mapping(path))
    except ValidationError as error:
        raise UserError(describe_validation_error(error, str(path))) from None


def load_cluster(path: Path) -> ClusterDescription:
    """A cluster description; ``catalogFile`` is resolved relative to the cluster file."""
    data = _mapping(path)
    catalog_file = data.pop("catalogFile", None)
    if catalog_file is not None:
        if "catalog" in data:
            raise UserError(f"{path}: set either catalog or catalogFile, not both")
        data["catalog"] = load_catalog(path.parent / str(catalog_file))
    try:
        return ClusterDescription.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, str(path))) from None
