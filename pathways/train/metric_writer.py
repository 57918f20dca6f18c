"""Metric writers: JSON lines in the workdir and TensorBoard event files (no TensorFlow).

`metrics.jsonl` holds each step once: a writer opened to resume at step S drops the lines
of steps after S (a crashed run may have logged steps it never checkpointed). In a
multi-process run only process 0 writes (`enabled=False` elsewhere): metrics are global.
"""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:  # a line cut by a kill
            continue
          if row.get('step', 0) <= resume_step:
            keep.append(line if line.endswith('\n') else line + '\n')
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(keep)
      os.replace(self.path + '.tmp', self.path)
    self._file = open(self.path, 'a')
    events = os.path.join(workdir, 'tensorboard')
    if os.path.isdir(events):  # files of starts killed before their first flush hold nothing
      for name in os.listdir(events):
        path = os.path.join(events, name)
        if name.startswith('events.out') and os.path.getsize(path) == 0:
          os.remove(path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)

  def _explained(self, fn, *args, path=None):
    """Runs a write; an OSError (a full disk) is re-raised naming the file or folder."""
    try:
      return fn(*args)
    except OSError as e:
      from pathways.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
      raise workdir_lib.explain_os_error(e, path or self.path) from e

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self._explained(self._write, step, metrics)

  def _write(self, step: int, metrics: dict) -> None:
    row = {'step': int(step)}
    for key, value in metrics.items():
      value = np.asarray(value)
      if value.size == 1:
        row[key] = float(value)
        if math.isfinite(row[key]):
          self._tb.add_scalar(key, row[key], step)
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def figure(self, step: int, name: str, png: bytes) -> None:
    """A rendered figure (PNG bytes, e.g. the report's labelled heatmap) as a TensorBoard
    image."""
    if not self.enabled:
      return
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    pixels = matplotlib.image.imread(io.BytesIO(png), format='png')  # [H, W, 4] in [0, 1]
    self._tb.add_image(name, (255 * pixels[..., :3]).astype(np.uint8), step,
                       dataformats='HWC')

  def flush(self) -> None:
    """Puts everything written so far on disk (called before each checkpoint is saved, so a
    kill loses no point of a committed step)."""
    if not self.enabled:
      return
    self._explained(self._file.flush)
    self._explained(self._tb.flush, path=os.path.join(os.path.dirname(self.path), 'tensorboard'))

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
