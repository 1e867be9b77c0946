"""The device catalog from a file or a ConfigMap, re-read only when it changes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.manifests import load_catalog
from hetmoe_operator.api.operator_config import CatalogSource
from hetmoe_operator.errors import UserError


@dataclass
class CatalogLoader:
    """Returns the current catalog, or None (logged) if it is missing or invalid.

    A missing catalog is not fatal: jobs wait Pending with ``CatalogUnavailable``
    until the ConfigMap appears, instead of the operator crash-looping.
    """

    source: CatalogSource
    namespace: str
    api: Any
    """A CoreV1Api (raw JSON answers)."""
    max_age_seconds: float = 10.0
    """Reuse the last good catalog this long without asking the API server again."""
    _cache: tuple[str, DeviceCatalog] | None = field(default=None, init=False)
    _loaded_at: float = field(default=-1e18, init=False)
    last_error: str = field(default="", init=False)

    def load(self) -> DeviceCatalog | None:
        """The catalog: at most one GET per ``max_age_seconds``; a file is parsed again
        only when its modification time changes (every pass asks)."""
        if self._cache and time.monotonic() - self._loaded_at < self.max_age_seconds:
            return self._cache[1]
        if self.source.file:
            return self._load_file(Path(self.source.file))
        namespace = self.source.config_map_namespace or self.namespace
        try:
            response = self.api.read_namespaced_config_map(
                self.source.config_map, namespace, _preload_content=False
            )
        except ApiException as error:
            self.last_error = f"configmap {namespace}/{self.source.config_map}: {error.reason}"
            return None
        body = json.loads(response.data)
        version = body["metadata"].get("resourceVersion", "")
        if self._cache and self._cache[0] == version:
            self._loaded_at = time.monotonic()
            return self._cache[1]
        try:
            text = (body.get("data") or {})[self.source.key]
            catalog = DeviceCatalog.model_validate(yaml.safe_load(text))
        except (KeyError, yaml.YAMLError, ValidationError) as error:
            self.last_error = f"catalog in {self.source.config_map}/{self.source.key}: {error}"
            return None
        self._cache = (version, catalog)
        self._loaded_at = time.monotonic()
        return catalog

    def _load_file(self, path: Path) -> DeviceCatalog | None:
        try:
            version = str(path.stat().st_mtime_ns)
        except OSError as error:
            self.last_error = f"catalog file {path}: {error.strerror}"
            return None
        if self._cache and self._cache[0] == version:
            return self._cache[1]
        try:
            catalog = load_catalog(path)
        except UserError as error:
            self.last_error = str(error)
            return None
        self._cache = (version, catalog)
        return catalog
