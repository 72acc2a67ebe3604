"""Config helpers shared by the commands: option fields with their help written once; versions."""

from __future__ import annotations

import platform
from dataclasses import field


def opt(default, help: str, **kw):
    """A config field with its help text, written once (the CLI reads it)."""
    return field(default=default, metadata={"help": help, **kw})


def reopt(cls, name: str, default, **kw):
    """Option ``name`` of the options class ``cls`` with another default for one command (help kept)."""
    import dataclasses

    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field(default=default, metadata={**f.metadata, **kw})


def versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"gradscope": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "numpy", "pandas", "scipy", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
