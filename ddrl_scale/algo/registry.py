"""Registry of algorithm functions by name (losses, advantage estimators), chosen from the config."""

from __future__ import annotations

from collections.abc import Callable

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: `@register("loss", "ddrl")` makes the function available as get("loss", "ddrl")."""

    def decorator(function: Callable) -> Callable:
        table = _REGISTRY.setdefault(kind, {})
        if name in table:
            raise ValueError(f"{kind} '{name}' is registered twice")
        table[name] = function
        return function

    return decorator


def get(kind: str, name: str) -> Callable:
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise ValueError(f"unknown {kind} '{name}'; registered: {', '.join(sorted(table)) or 'none'}")
    return table[name]


def available(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))
