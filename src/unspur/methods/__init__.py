"""Methods, one module each, found by name in one registry."""

from unspur.methods.base import (
    Method,
    RunContext,
    Supervision,
    available_methods,
    get_method,
    register_method,
)

__all__ = [
    "Method",
    "RunContext",
    "Supervision",
    "available_methods",
    "get_method",
    "register_method",
]
