"""Stages from outside Rankwise: a module that registers stages with the decorators the built-in ones use
(compress.stages.base.register_*, compress.methods.register) is imported by name or path (`--plugin MODULE`,
`plugins:` in a sweep file), or found through the `rankwise.stages` entry point group of an installed package.
Importing it registers its stages; a recipe then names them like any other (docs/stages.md)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from rankwise.errors import RankwiseError, first_line

ENTRY_POINT_GROUP = "rankwise.stages"
_loaded: set[str] = set()


def load_plugin(spec: str) -> None:
    """Import one plugin: a module name (`my_pkg.stages`) or a path to a .py file. Imported once."""
    if spec in _loaded:
        return
    try:
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise RankwiseError(f"plugin {spec!r}: no such file")
            name = f"rankwise_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except RankwiseError:
        raise
    except ModuleNotFoundError as e:
        raise RankwiseError(f"plugin {spec!r} cannot be imported: {first_line(e)} (a module on the Python path "
                            f"or a path to a .py file)") from None
    except Exception as e:
        raise RankwiseError(f"plugin {spec!r} failed to import: {type(e).__name__}: {first_line(e)}") from None
    _loaded.add(spec)


def load_plugins(specs=()) -> None:
    """The installed packages' `rankwise.stages` entry points (once), then the plugins named."""
    if ENTRY_POINT_GROUP not in _loaded:
        _loaded.add(ENTRY_POINT_GROUP)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:
                raise RankwiseError(f"plugin entry point {ep.name!r} ({ep.value}) failed to import: "
                                    f"{type(e).__name__}: {first_line(e)}") from None
    for spec in specs:
        load_plugin(spec)
