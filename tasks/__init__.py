"""Built-in task plugins; importing this package registers them all."""
from tasks import algorithmic  # noqa: F401
from tasks import catalogue  # noqa: F401
from tasks import digits  # noqa: F401
from tasks import pycode  # noqa: F401
from tasks import few_shot  # noqa: F401
from tasks import glyphs  # noqa: F401
