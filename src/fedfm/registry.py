"""One generic registry: name -> implementation, refusing duplicates."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from fedfm.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of implementations of one extension point.

    Args:
        kind: what is registered (used in error messages), e.g. "algorithm".
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the implementation named ``name``.

        Raises:
            ConfigError: naming the unknown name and the registered ones.
        """
        try:
            return self._items[name]
        except KeyError:
            allowed = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r}; allowed: {allowed}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
