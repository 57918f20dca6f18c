"""One small registry: named factories with clear errors.

`Registry('dispatcher')` holds named objects; `register(name)` is a decorator, `lookup(name)`
names the known entries when a name is unknown, a second registration of a name names both
sources, and `temporary(name, obj)` registers for the duration of a `with` block (tests).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator


def _source(obj: Any) -> str:
  module = getattr(obj, '__module__', None) or '?'
  qualname = getattr(obj, '__qualname__', None) or type(obj).__name__
  try:
    where = f' ({inspect.getsourcefile(obj)})'
  except TypeError:
    where = ''
  return f'{module}.{qualname}{where}'


class Registry:
  """A mapping from names to objects of one kind (dispatchers, routers, tasks, ...)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}
    self._sources: dict[str, str] = {}

  def add(self, name: str, obj: Any, source: str | None = None) -> Any:
    """Registers `obj` under `name`; a duplicate name raises naming both sources."""
    if not isinstance(name, str) or not name:
      raise ValueError(f'{self.kind} name={name!r}: must be a non-empty string.')
    source = source or _source(obj)
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is registered twice: first by {self._sources[name]}, '
                       f'again by {source}.')
    self._entries[name] = obj
    self._sources[name] = source
    return obj

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator form of `add`."""
    return lambda obj: self.add(name, obj)

  def lookup(self, name: str) -> Any:
    if name not in self._entries:
      raise ValueError(f'unknown {self.kind} {name!r}; known: {sorted(self._entries)}.')
    return self._entries[name]

  def source(self, name: str) -> str:
    self.lookup(name)
    return self._sources[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  @contextlib.contextmanager
  def temporary(self, name: str, obj: Any) -> Iterator[Any]:
    """Registers `obj` for the duration of the block, then removes it."""
    self.add(name, obj)
    try:
      yield obj
    finally:
      del self._entries[name]
      del self._sources[name]
