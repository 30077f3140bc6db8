"""Methods: what is trained and how c_p is formed (registered plug-ins)."""

from .base import METHOD_REGISTRY, Method, get_method, register

__all__ = ["METHOD_REGISTRY", "Method", "get_method", "register"]
