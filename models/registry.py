"""Name → constructor tables that fail fast with the list of known names (timm's ``create_model`` style)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from clusterssl.errors import ModelError

T = TypeVar("T")


class Registry(Mapping[str, Callable[..., T]], Generic[T]):
    """A read-only table of constructors, built once from a dict.

    ``Registry("backbone", {"resnet18": make_resnet18}).create("resnt18")`` raises
    ``ModelError("unknown backbone 'resnt18'; known: resnet18")``.
    """

    def __init__(self, kind: str, constructors: Mapping[str, Callable[..., T]]) -> None:
        self.kind = kind
        self._constructors = dict(constructors)

    def __getitem__(self, name: str) -> Callable[..., T]:
        try:
            return self._constructors[name]
        except KeyError:
            known = ", ".join(sorted(self._constructors))
            raise ModelError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._constructors)

    def __len__(self) -> int:
        return len(self._constructors)

    def create(self, name: str, /, *args: object, **kwargs: object) -> T:
        return self[name](*args, **kwargs)
