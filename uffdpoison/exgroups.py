"""Trio wraps a task's exception in an ExceptionGroup: where a known failure is caught, unwrap."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def caught(exc: BaseException, types: type[E] | tuple[type[E], ...]) -> E | None:
    """``exc`` itself if it is one of ``types``, else the first of them inside it (a group),
    else None: where a command catches its expected failures, whether trio wrapped them or not."""
    if isinstance(exc, types):
        return exc
    return leaf_of(exc, types) if isinstance(exc, BaseExceptionGroup) else None


def leaf_of(group: BaseExceptionGroup, types: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of ``types`` inside a (nested) exception group, or None.

    Nurseries wrap a child's exception in a group; a task that ends a session for a known reason
    wants that reason back, and anything else (a Cancelled, a bug) to propagate untouched.
    """
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = leaf_of(exc, types)
            if found is not None:
                return found
        elif isinstance(exc, types):
            return exc
    return None
