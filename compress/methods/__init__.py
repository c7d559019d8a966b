"""Factorization methods, one module each, registered by name (adding a method is adding a file here)."""
from compress.methods import asvd, fwsvd, svd, svd_llm  # noqa: F401  (registration side effects)
from compress.methods.base import REGISTRY, Decomposition, Method, get_method, register

__all__ = ["REGISTRY", "Decomposition", "Method", "get_method", "register"]
