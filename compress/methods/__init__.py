"""Factorization methods, one module each, registered by name (adding a method is adding a file here)."""
from rankwise.compress.methods import asvd, fwsvd, svd, svd_llm  # noqa: F401  (registration side effects)
from rankwise.compress.methods.base import REGISTRY, Decomposition, Method, get_method, register

__all__ = ["REGISTRY", "Decomposition", "Method", "get_method", "register"]
