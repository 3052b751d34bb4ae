"""The one place inference backends are registered (the Frigate ``detectors/plugins`` pattern).

Each backend module defines a ``Backend`` subclass decorated with ``@register_backend``. Importing a backend
module is cheap: the runtimes themselves are imported only when a backend is probed or loads a model, so a node
without OpenVINO (say) still lists the OpenVINO backend, as unavailable with the reason.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional, TypeVar

from accelerators.base import Backend

if TYPE_CHECKING:
    from accelerators.config import AcceleratorsConfig

# Modules that define the built-in backends; importing one registers it.
PLUGIN_MODULES = (
    "accelerators.openvino_backend",
    "accelerators.litert_backend",
    "accelerators.opencv_backend",
)

_BACKENDS: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    if cls.name in _BACKENDS and _BACKENDS[cls.name] is not cls:
        raise RuntimeError(f"backend {cls.name!r} registered twice")
    _BACKENDS[cls.name] = cls
    return cls


def _load_plugins() -> None:
    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)


def backend_classes() -> dict[str, type[Backend]]:
    _load_plugins()
    return dict(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    classes = backend_classes()
    if name not in classes:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(sorted(classes))}")
    return classes[name]


def create_backends(config: Optional[AcceleratorsConfig] = None) -> dict[str, Backend]:
    """One instance of every registered backend, configured from the ``accelerators`` config section."""
    from accelerators.config import AcceleratorsConfig

    config = config or AcceleratorsConfig()
    return {name: cls(config.backend_config(name)) for name, cls in backend_classes().items()}
