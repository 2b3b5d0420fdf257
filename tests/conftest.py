"""Shared fixtures, and the test tiers.

The tiers are folders; each test gets the marker of its folder here (pytest -m unit / integration / e2e):

    tests/unit         pure functions and small models: no Ray, no MLflow store, no S3 server, no server or job in a
                       subprocess (an in-process loopback HTTP site is fine); seconds each
    tests/integration  real components: the session's local Ray, Ray Data / Train / Serve, MLflow, the moto S3
                       server, HTTP servers, headless Chromium, torch.distributed process groups, torch.compile
    tests/e2e          the full chains: the README's cluster section run as written, a two-node Ray cluster

`make test-fast` runs unit + integration, `make test` (CI) all three. A test file outside these folders is an error.

Ray: one capped local Ray for the whole session (`ray_local`), started when a test first asks for it. A test that
needs a Ray of its own (a multi-node cluster, Ray's own start-up) is marked `own_ray` and shuts the shared one down;
it runs after the other tests of its tier, and a test after it that asks for `ray_local` gets a fresh one. Never
`ray stop`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e")  # also the order a whole-suite run takes them in
DEV_DATA = (ROOT.parent / "shared" / "data" / "dev").resolve()
ASSET_PHOTOS = ROOT / "assets" / "photos"
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers.s3_fixture import TEST_ENV as S3_TEST_ENV  # noqa: E402 - needs ROOT on sys.path


def dev_photos() -> list[Path]:
    """Real photos for tests: ../shared/data/dev when present (CI has it), else the photos the project ships."""
    root = DEV_DATA if DEV_DATA.is_dir() else ASSET_PHOTOS
    return sorted(p for p in root.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


# --- tiers ----------------------------------------------------------------------------------------------------------

def tier_of(path: Path) -> str | None:
    rel = Path(path).resolve().relative_to(TESTS)
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in TIERS else None


def pytest_collection_modifyitems(session, config, items):
    """Each test gets its folder's marker; a whole-suite run takes the tiers in order (unit first: the quickest
    failures first); the session's shared Ray is shut down after the last test that uses it."""
    outside = sorted({str(Path(item.path).relative_to(ROOT)) for item in items if tier_of(item.path) is None})
    if outside:
        raise pytest.UsageError(f"test files outside the tiers {', '.join(f'tests/{t}' for t in TIERS)}: "
                                f"{', '.join(outside)}; move each into the tier it belongs to (tests/conftest.py)")
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item.path)))
    # stable: file and test order kept in a tier, except that the tests with a Ray of their own come last in theirs,
    # so that the shared Ray is started once per tier
    items.sort(key=lambda item: (TIERS.index(tier_of(item.path)), item.get_closest_marker("own_ray") is not None))


def pytest_collection_finish(session):
    users = [item for item in session.items if "ray_local" in item.fixturenames]  # after any deselection
    SHARED_RAY.last_user = users[-1].nodeid if users else None


# --- shared fixtures ------------------------------------------------------------------------------------------------

_MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
_MLFLOW_AT_START = {name: os.environ.get(name) for name in _MLFLOW_VARIABLES}


@pytest.fixture(autouse=True)
def mlflow_environment_restored():
    """After each test, MLflow's URI/experiment variables are back to what the session started with: a test that
    calls mlflow.set_tracking_uri / set_experiment itself (MLflow writes those into os.environ) must not point the
    next test's jobs at its store."""
    yield
    for name, value in _MLFLOW_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return dev_photos()


class SharedRay:
    """The session's local Ray: 2 CPUs, a capped object store, workers that import this checkout and hold the moto
    server's test credentials (tests/helpers/s3_fixture.py: any moto server accepts them, so the workers reach
    whichever one a test starts, also one started after this Ray)."""

    def __init__(self) -> None:
        self.node_id: str | None = None
        self.in_use = False  # the session fixture was set up: every later test asking for it gets it running
        self.last_user: str | None = None  # the pytest node id of the last test that uses it (set at collection)
        self.starts = 0

    def alive(self) -> bool:
        import ray

        if self.node_id is None or not ray.is_initialized():
            return False
        return ray.get_runtime_context().get_node_id() == self.node_id

    def ensure(self):
        """The running shared Ray; started (again) when it is not: never started, shut down by a test, or replaced
        by another Ray a test started in this process."""
        import ray

        if self.alive():
            return ray
        if ray.is_initialized():
            ray.shutdown()
        from jobkit.ray_env import start_local_ray

        start_local_ray({"PYTHONPATH": str(ROOT), **S3_TEST_ENV}, num_cpus=2,
                        object_store_memory=300 * 2**20)  # quiet workers
        self.node_id = ray.get_runtime_context().get_node_id()
        self.starts += 1
        return ray

    def stop(self) -> None:
        import ray

        if self.alive():
            ray.shutdown()
        self.node_id = None


SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def ray_local():
    """The session's shared local Ray (SharedRay); module- and session-scoped fixtures may use it."""
    SHARED_RAY.in_use = True
    yield SHARED_RAY.ensure()
    SHARED_RAY.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of a test that uses `ray_local`: the shared Ray runs (a test before it may have shut it
    down to start a Ray of its own)."""
    if SHARED_RAY.in_use and "ray_local" in item.fixturenames:
        SHARED_RAY.ensure()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test that uses the shared Ray (and its module's fixtures): shut it down, so that the tests
    after it (the e2e tier's own clusters) have the machine's memory."""
    yield
    if item.nodeid == SHARED_RAY.last_user:
        SHARED_RAY.stop()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: the models in tests are tiny and the test machine's 2 cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
