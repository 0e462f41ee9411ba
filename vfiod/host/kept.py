"""`kept`: a property computed on first read and then kept on the instance, without a lock.

`functools.cached_property` in Python 3.11 takes an RLock on every first read; a listing of 4096 functions
makes ~70k first reads, and the lock was a fifth of discovery's own time. The read models that use this
belong to one call (a snapshot is never shared between threads), and a race would only compute the same
value twice. Python 3.12 dropped the lock from cached_property, when this can go.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class kept(Generic[T]):
    def __init__(self, compute: Callable[[Any], T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> kept[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> T | kept[T]:
        if obj is None:
            return self
        # A non-data descriptor: once the value is in the instance's __dict__, reads never come here again.
        value = self._compute(obj)
        obj.__dict__[self._name] = value
        return value
