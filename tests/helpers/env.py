"""Environment variables a test or fixture changes, put back as they were (set, changed or absent) afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def restored_environ(keys: Iterable[str]) -> Iterator[None]:
    """Whatever happens to `keys` inside the block (set here, or by a library such as ray.init) is undone."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
