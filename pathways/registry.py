"""One small registry: named factories with clear errors.

`Registry('dispatcher')` holds named objects; `register(name)` is a decorator, `lookup(name)`
names the known entries when a name is unknown, a second registration of a name names both
sources, and `temporary(name, obj)` registers for the duration of a `with` block (tests).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
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
    self.entry_type = None  # the class entries must be, when the kind's module has said so
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

  def remove(self, name: str) -> None:
    """Forgets `name` (tests and interactive sessions); unknown names are ignored."""
    self._entries.pop(name, None)
    self._sources.pop(name, None)

  def names(self, sort: bool = True) -> list[str]:
    """Registered names, sorted (or in registration order)."""
    return sorted(self._entries) if sort else list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  @contextlib.contextmanager
  def temporary(self, name: str, obj: Any) -> Iterator[Any]:
    """Registers `obj` for the duration of the block, then removes it."""
    self.add(name, obj)
    try:
      yield obj
    finally:
      self.remove(name)


# ----------------------------------------------------------------------------- tasks

TASKS = Registry('task')
ENTRY_POINT_GROUP = 'pathways.tasks'


def register_task(task, source: str | None = None):
  """Registers a `pathways.task.Task` (a call, or a decorator on a zero-argument factory).

  `source` names where it comes from in a duplicate-name error (default: the factory, or the
  module that calls with a Task object). Returns what it was given, so `@register_task`
  leaves the factory usable.
  """
  def is_task(obj):  # TASKS.entry_type is pathways.task.Task once that module is imported
    return TASKS.entry_type is not None and isinstance(obj, TASKS.entry_type)

  if source is None:
    if is_task(task):
      caller = sys._getframe(1).f_globals.get('__name__', '?')  # pylint: disable=protected-access
      source = f'module {caller}'
    else:
      source = _source(task)
  built = task if is_task(task) else task() if callable(task) else task
  if not is_task(built):
    raise ValueError(f'register_task got {type(built).__name__}; expected a pathways.task.Task '
                     f'or a factory returning one.')
  TASKS.add(built.name, built, source=source)
  return task


def get_task(name: str):
  """The registered task called `name`; an unknown name lists the known ones and any
  plugins that failed to load (the task may be one of theirs)."""
  try:
    return TASKS.lookup(name)
  except ValueError as e:
    broken = broken_plugins()
    if not broken:
      raise
    raise ValueError(f'{e} Plugins that failed to load (their tasks are missing): '
                     f'{broken}') from None


def import_task_modules(modules) -> None:
  """Imports plugin modules (they register tasks when imported), naming any that fail."""
  import importlib  # pylint: disable=g-import-not-at-top

  for module in modules:
    try:
      importlib.import_module(module)
    except Exception as e:  # pylint: disable=broad-except
      raise ImportError(f'task plugin module {module!r} failed to import: '
                        f'{type(e).__name__}: {e}') from e


# (distribution, entry point, value) -> None once loaded, or why it failed to load.
_ENTRY_POINTS: dict[tuple[str, str, str], str | None] = {}


def load_entry_point_tasks(skip=()) -> list[str]:
  """Loads every installed distribution's entry points in the group 'pathways.tasks'.

  An entry point may name a module (importing it registers its tasks) or a callable (called
  with no arguments; it registers tasks or returns Task objects to register). Each is loaded
  once per process (calling again is a no-op). One that fails to load is reported once as a
  warning and left out: runs that need its tasks fail naming it (`get_task`), others go on.
  Entry points named in `skip` are not loaded. Returns the names of the entry points loaded.
  """
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  loaded = []
  for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
    if ep.name in skip:
      continue
    dist = getattr(ep.dist, 'name', '?')
    key = (dist, ep.name, ep.value)
    if key not in _ENTRY_POINTS:
      source = f'entry point {ep.name!r} = {ep.value!r} (distribution {dist!r})'
      try:
        obj = ep.load()
        if callable(obj):
          for t in (obj() or ()):
            register_task(t, source=source)
        _ENTRY_POINTS[key] = None
      except Exception as e:  # pylint: disable=broad-except
        _ENTRY_POINTS[key] = (f'task plugin {source} failed to load: {type(e).__name__}: {e}')
        logging.warning('%s; its tasks are not available (runs that do not use them go on; '
                        '--skip_plugin=%s leaves it out).', _ENTRY_POINTS[key], ep.name)
    if _ENTRY_POINTS[key] is None:
      loaded.append(ep.name)
  return loaded


def broken_plugins() -> list[str]:
  """Why each entry point that failed to load failed."""
  return [msg for msg in _ENTRY_POINTS.values() if msg]


BUILTIN_TASK_MODULES = ('tasks',)


def discover(task_modules=(), *, builtin: bool = True, entry_points: bool = True,
             skip_plugins=()) -> list[str]:
  """Registers every task a run can see: the built-in `tasks` package, the plugin modules named
  in the experiment config (`config.task_modules`) or on the command line, and installed
  distributions' `pathways.tasks` entry points. Returns the registered task names.

  Importing a module twice is a no-op and entry points load once, so `discover` may be called
  more than once. A plugin module named here that fails to import is an error (the run asked
  for it); an installed entry point that fails is a warning (see `load_entry_point_tasks`).
  """
  import_task_modules((BUILTIN_TASK_MODULES if builtin else ()) + tuple(task_modules))
  if entry_points:
    load_entry_point_tasks(skip=skip_plugins)
  return TASKS.names()
