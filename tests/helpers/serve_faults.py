"""Faults the Serve tests inject into the endpoint's model replicas (inference.serve.deployment.Hooks): the serving
code holds no test-only behaviour. Importable by the replicas (the tests' Ray puts the checkout on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from inference.serve.deployment import Hooks


class SeedFaults(Hooks):
    """A request with seed `raise_seed` fails inside the model run (with a message that must not reach the
    client); one with seed `sleep_seed` waits `sleep_s` before joining a batch (a model run outliving a deadline,
    or a request a replica holds while the test kills it). Each replica, once its model is loaded, waits
    `load_delay_s` more (`reload_delay_s` when `load_log` already records a load: a replacement) and then appends
    the time to `load_log` (a file) when one is given."""

    SECRET = "fault injection: secret /internal/path must not reach the client"

    def __init__(self, raise_seed: int, sleep_seed: int, sleep_s: float, load_delay_s: float = 0.0,
                 load_log: str = "", reload_delay_s: float | None = None):
        self.raise_seed, self.sleep_seed, self.sleep_s = raise_seed, sleep_seed, sleep_s
        self.load_delay_s, self.load_log = load_delay_s, load_log
        self.reload_delay_s = load_delay_s if reload_delay_s is None else reload_delay_s

    def after_load(self) -> None:
        reload = bool(self.load_log) and Path(self.load_log).is_file() and Path(self.load_log).read_text().strip()
        time.sleep(self.reload_delay_s if reload else self.load_delay_s)
        if self.load_log:
            with Path(self.load_log).open("a") as f:
                f.write(f"{time.time()}\n")

    async def before_batch(self, item) -> None:
        if item.options.seed == self.sleep_seed:
            await asyncio.sleep(self.sleep_s)

    def before_model(self, items) -> None:
        if any(i.options.seed == self.raise_seed for i in items):
            raise RuntimeError(self.SECRET)
