"""Rankwise: SVD-family low-rank compression of Hugging Face causal language models.

The repository's top-level folders are installed as one package: rankwise.cli, rankwise.compress,
rankwise.calib, rankwise.eval, rankwise.configs, and rankwise.errors (errors.py beside this file).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rankwise")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled source tree
    __version__ = "0+unknown"


def __getattr__(name: str):
    """`rankwise.oneshot` (compress/oneshot.py), imported on first use: `import rankwise` stays light."""
    if name == "oneshot":
        from rankwise.compress.oneshot import oneshot
        return oneshot
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
