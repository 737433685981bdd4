"""Thin framework adapters over the igq_plugin core, importable as ``igq_plugin.integrations.<name>``.

Each adapter imports its framework lazily and raises ImportError naming the extra to install
(``pip install "igq_plugin[<extra>]"``) when it is missing. Adapters use only the public core API.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import optional dependency ``module`` or raise ImportError naming the igq_plugin extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this igq_plugin integration needs '{module}', which is not installed: "
            f'pip install "igq_plugin[{extra}]"'
        ) from err
