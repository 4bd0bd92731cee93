"""The one shape of an owned resource: ``close()`` releases it (a second call does nothing),
and ``with`` closes it on the way out."""

from __future__ import annotations

from typing import Self


class Owned:
    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
