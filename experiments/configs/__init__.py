"""Experiment configs (one module per experiment, `get_config(arg)`), and the parsing of
their `--config=FILE:ARG` argument: 'key=value,key=value'."""
from __future__ import annotations


def parse(arg: str | None, allowed: dict[str, str]) -> dict[str, str]:
  """{key: value} of `arg`; 'runlocal' is dropped (these configs already fit 2 CPU cores);
  a key outside `allowed` ({key: placeholder}) is refused, listing what is allowed."""
  args = dict(part.partition('=')[::2] for part in filter(None, (arg or '').split(',')))
  args.pop('runlocal', None)
  unknown = set(args) - set(allowed)
  if unknown:
    listed = ', '.join(f'{k}={v}' for k, v in allowed.items())
    raise ValueError(f'config argument {sorted(unknown)}: allowed are {listed}.')
  return args


def choice(args: dict, key: str, default: str, allowed) -> str:
  """args[key] (or `default`), refused unless one of `allowed`."""
  value = args.get(key, default)
  if value not in allowed:
    raise ValueError(f'config argument {key}={value!r}: allowed are {tuple(allowed)}.')
  return value
