"""Shared fixtures, and the test tiers.

The tiers are folders; each test gets the marker of its folder here (pytest -m unit / integration / e2e):

    tests/unit         pure functions and small models: no Ray, no MLflow store, no S3 server, no server or job in a
                       subprocess (an in-process loopback HTTP site is fine); seconds each
    tests/integration  real components, seconds to tens of seconds each: the session's local Ray, Ray Data and
                       Serve, MLflow, the moto S3 server, HTTP servers, headless Chromium, torch.distributed
                       process groups, torch.compile
    tests/e2e          whole jobs as a user runs them, and their failures: every Ray Train fit (pretrain, FSDP,
                       online, distill), curate runs killed or failing and run again, the Serve app losing its
                       model replica or redeployed under load, the README's cluster section run as written, a
                       two-node Ray cluster

`make test-fast` runs unit + integration, `make test` (CI) all three, each tier in a pytest process of its own with
the arguments scripts/test-tiers.sh gives it (unit and e2e on pytest-xdist workers, each with its own Rays). A test
file outside these folders is an error.

Ray: one capped local Ray for the whole session (`ray_local`), started when a test first asks for it; each test
module joins it as a Ray job of its own (SharedRay). A test that needs a Ray of its own (a multi-node cluster, Ray's
own start-up) is marked `own_ray`: the shared one is shut down before it (a later test gets a new one), and it runs
after the other tests of its tier. A module whose tests run Ray Train fits on the shared Ray is marked `ray_train`
(it joins with a training job's runtime_env). Never `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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
# Ray Train's controller polls its workers every 2 s by default: the tests' tiny fits (a few steps each) notice a
# finished or failed worker group sooner at 0.5 s. Set before any Ray starts, so every Ray of the session has it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each pytest process (each xdist worker too) keeps its Rays to a temporary folder of its own. A Ray process that
# looks for "its" cluster without an address (Ray Train's placement-group cleaner asks the State API so) reads the
# "latest cluster" file in Ray's default folder, $RAY_TMPDIR/ray/ray_current_cluster, which a cluster started by
# ray.cluster_utils or `ray start` writes: with one shared /tmp/ray, two processes' Rays answer for each other.
# Short (Ray's socket paths must stay under 107 bytes); removed at the end of a session that passed.
RAY_TMPDIR = tempfile.mkdtemp(prefix="vosr-t-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR

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


def pytest_sessionfinish(session, exitstatus):
    """The session's Ray folder goes when every test passed (Ray's logs stay for a failure)."""
    if exitstatus == 0:
        SHARED_RAY.stop()
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


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
    if "mlflow" in sys.modules:  # and no process-wide registry left behind: clients would register there
        sys.modules["mlflow"].set_registry_uri("")
    for name, value in _MLFLOW_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return dev_photos()


class SharedRay:
    """The session's local Ray: one head node (2 CPUs, a capped object store, no dashboard) started once, which each
    test module joins as a Ray job of its own (`ray.init(address=...)`, a few seconds instead of a new Ray). A job's
    worker processes end with it, so what a module's tasks leave in their processes (MLflow's URIs and experiment,
    environment variables, imported state) never reaches the next module's tasks, as with a Ray per module. Every
    worker gets this checkout on its PYTHONPATH and the moto server's test credentials (tests/helpers/s3_fixture.py:
    any moto server accepts them, so the workers reach whichever one a test starts, also one started after the
    head) from the head's own environment; a module marked `ray_train` (its tests run Ray Train fits) joins with the
    quiet hook of a training job (jobkit.ray_env.local_runtime_env), any other with no runtime_env, as the
    project's jobs do on a local Ray (a runtime_env costs every worker start an extra Ray import)."""

    def __init__(self) -> None:
        self.cluster = None
        self.module: Path | None = None  # the test module whose job the driver is connected as
        self.last_user: str | None = None  # the pytest node id of the last test that uses it (set at collection)
        self.starts = self.jobs = 0

    def connected(self) -> bool:
        import ray

        return (self.cluster is not None and ray.is_initialized()
                and ray.get_runtime_context().gcs_address == self.cluster.address)

    def ensure(self, module: Path | None = None, ray_train: bool = False):
        """The shared Ray, connected as `module`'s job: the head is started when there is none (or it died), and
        the driver joins it again when it is not connected (a test shut it down, or started a Ray of its own) or
        connected as another module's job."""
        import ray
        from ray.cluster_utils import Cluster

        from jobkit.ray_env import local_runtime_env

        if self.cluster is None or not self.cluster.remaining_processes_alive():
            if ray.is_initialized():
                ray.shutdown()
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 2, "object_store_memory": 300 * 2**20, "include_dashboard": False,
                "env_vars": {"PYTHONPATH": str(ROOT), **S3_TEST_ENV}})
            self.module = None
            self.starts += 1
        if self.connected() and (module is None or module == self.module):
            return ray
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=self.cluster.address, runtime_env=local_runtime_env(ray_train))
        self.module = module
        self.jobs += 1
        return ray

    def stop(self) -> None:
        import ray

        if self.connected():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.cluster = self.module = None


SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def ray_local():
    """The session's shared local Ray (SharedRay), connected as the running test module's job; module- and
    session-scoped fixtures may use it."""
    yield SHARED_RAY.ensure()
    SHARED_RAY.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of a test that uses `ray_local` (its module's fixtures included): the shared Ray runs and
    the driver is connected to it as this module's job."""
    if item.get_closest_marker("own_ray") is not None:
        # A Ray started in this process (ray.init without an address, as jobkit.ray_env.init_ray does) switches
        # the process to token authentication for good (Ray sets RAY_AUTH_MODE=token and keeps the token
        # in-process). Joining the shared head afterwards, started before without it, fails: the head destroys
        # the joining job's actors as if their owner had died (the e2e tier's first curate run lost its crawl
        # gates so). So the shared head ends before such a test; a later test that asks for it gets a new one.
        SHARED_RAY.stop()
    elif "ray_local" in item.fixturenames:
        SHARED_RAY.ensure(Path(item.path), ray_train=item.get_closest_marker("ray_train") is not None)


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
