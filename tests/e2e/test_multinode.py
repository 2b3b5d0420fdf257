"""Multi-node behaviour on one machine: a two-node Ray cluster (ray.cluster_utils.Cluster: a head and a worker
node, each its own raylet and object store). Curation and a short pretraining run across both nodes; the worker
node is killed mid-job (its raylet and every worker process on it), and each job still ends with a complete,
correct result: curation keeps exactly the right photos and accounts for every URL once; pretraining restarts
its lost workers on a spare node, from the latest complete checkpoint (Ray Train alone would restart them from
step 1 when its controller had not yet collected the checkpoint reports, training/resume.py), and finishes every
step with continuous step numbers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20
# Ray Train's controller polls workers (and registers reported checkpoints) this often; the worker loop waits for
# each checkpoint's registration, so a short interval keeps the pretraining test quick
pytestmark = pytest.mark.own_ray  # a cluster of its own (tests/conftest.py)


@pytest.fixture
def two_nodes():
    """Head (1 CPU) + worker node (2 CPUs); the driver joins the head. Shut down after the test."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 120 * MB, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, object_store_memory=120 * MB)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


class NodeKiller(threading.Thread):
    """Kill a worker node as soon as `ready()` is true (the job is demonstrably mid-way): `node`, or else the
    worker node whose CPUs are in use (where the Ray Train workers run)."""

    def __init__(self, cluster, ready, node=None):
        super().__init__(daemon=True)
        self.cluster, self.ready, self.node = cluster, ready, node
        self.job_done = threading.Event()  # set by the test when the job returned: no kill after that
        self.killed_at: float | None = None
        self.error: BaseException | None = None

    def _pick_node(self):
        if self.node is not None:
            return self.node
        from ray._private.state import available_resources_per_node, total_resources_per_node

        # the worker node whose CPUs are taken (Ray Train workers hold theirs for the whole run)
        free, total = available_resources_per_node(), total_resources_per_node()
        for node in self.cluster.worker_nodes:
            nid = node.node_id
            if nid in total and free.get(nid, {}).get("CPU", 0.0) < total[nid].get("CPU", 0.0):
                return node
        return None

    def run(self) -> None:
        try:
            target = None
            while target is None:
                while not self.ready():
                    if self.job_done.wait(0.1):
                        return
                target = self._pick_node()
                if target is None and self.job_done.wait(0.2):
                    return
            self.cluster.remove_node(target, allow_graceful=False)
            self.killed_at = time.time()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            import traceback

            self.error = RuntimeError(f"{exc!r}\n{traceback.format_exc()}")


def _photo_subset(n: int = 8) -> tuple[list[str], list[str]]:
    from demo.photo_server import list_photos

    names = [p.name for p in list_photos()]
    keep = names[:n]
    return keep, [x for x in names if x not in keep]


def test_curate_survives_losing_the_worker_node(two_nodes, tmp_path):
    import pyarrow.parquet as pq

    from demo.photo_server import PhotoServer
    from jobkit.config import config_from_dict
    from pipelines.curate import run
    from pipelines.curate_schema import STAGE1_DIR, shard_files

    cluster, worker = two_nodes
    keep, exclude = _photo_subset(8)
    out = tmp_path / "curated"
    with PhotoServer(exclude=exclude, num_duplicates=1) as site:
        urls = site.write_url_list(tmp_path / "urls.txt")
        cfg = config_from_dict({"run": {"output_root": str(tmp_path), "mlflow": {"enabled": False}},
                                "curate": {
            "sources": [str(urls)], "output": str(out), "rows_per_shard": 2, "cpus_per_block": 0.5,
            "crawl": {"allow_hosts": ["127.0.0.1"], "timeout_s": 10.0, "retries": 1, "backoff_s": 0.05},
            "filters": {"min_short_side": 256, "min_gradient": 0.0, "min_entropy": 0.0, "max_upscale": 0},
            "balance": {"num_clusters": 2, "sample_size": 100}}})

        def first_ledgers_written() -> bool:
            folder = out / STAGE1_DIR
            return folder.is_dir() and any(folder.rglob("*.parquet"))

        killer = NodeKiller(cluster, first_ledgers_written, node=worker)
        killer.start()
        t0 = time.time()
        try:
            summary = run(cfg)
        finally:
            killer.job_done.set()
        finished = time.time()
        killer.join(timeout=30)
        planted = site.expected()
        dups = {s.path: s.original for s in site.site if s.kind == "near_duplicate"}
        base = site.base_url
    assert killer.error is None, killer.error
    assert killer.killed_at is not None and t0 < killer.killed_at < finished, "the node was not killed mid-job"
    # every URL accounted for exactly once, by reason
    n_urls = sum(planted.values())
    assert summary["seen"] == n_urls
    assert summary["failed"] == {"http_404": 1, "truncated": 1, "not_image_html": 1}
    assert summary["duplicates"] == planted["near_duplicate"] == 2
    assert summary["kept"] == len(keep) == 8
    assert summary["ok"] + sum(summary["failed"].values()) + sum(summary["filtered"].values()) == n_urls
    # the kept set: one row per original photo (the photo itself or its planted copy), nothing else
    rows = [r for f in shard_files(str(out)) for r in pq.read_table(f).to_pylist()]
    kept = [r for r in rows if r["duplicate_of"] is None]
    originals = set()
    for r in kept:
        path = r["source"][len(base):]
        originals.add(dups.get(path, path.rsplit("/", 1)[-1]))
    assert sorted(originals) == sorted(keep)
    assert len({r["id"] for r in kept}) == len(kept) == 8


# enough steps after the kill point (checkpoint 4) that the node dies while training still runs, however fast
# the machine is; with 8 steps the job could finish before the node was gone and no restart happened
STEPS = 24


def test_pretraining_resumes_on_a_replacement_node(two_nodes, tmp_path, photos):
    from mlflow.tracking import MlflowClient

    from jobkit.config import load_config
    from tests.helpers.train_data import make_feature_shards
    from training.pretrain import run
    from training.resume import latest_complete
    from vosr.checkpoint import load_checkpoint

    cluster, _ = two_nodes
    overrides = [f"run.output_root={tmp_path}", "run.name=multinode", "data.resolution=32",
                 "data.holdout_fraction=0.0", "semantic.input_size=32", "model.hidden_size=32",
                 "model.depth=1", "model.num_heads=2", f"train.steps={STEPS}", "train.batch_size=4",
                 "train.num_workers=2", "train.cpus_per_worker=1.0", "train.checkpoint_every=2",
                 "train.log_every=1", "train.val_images=0", "train.max_failures=3", "train.cache_data=true",
                 f"train.storage_path={tmp_path / 'ckpt'}", f"train.features={tmp_path / 'features'}"]
    cfg = load_config(ROOT / "configs/train/tiny.yaml", overrides)
    make_feature_shards(cfg, photos[:8], tmp_path / "features", rows_per_shard=2)
    run_dir = tmp_path / "ckpt" / "multinode"

    def second_checkpoint_written() -> bool:  # complete on disk (its manifest matches), registered or not
        found = latest_complete(str(run_dir))
        return found is not None and found[0] >= 4

    # a spare node, idle or not, so the job has somewhere to restart the workers it loses (as a KubeRay
    # replacement pod would); the node killed is whichever worker node hosts a Ray Train worker
    cluster.add_node(num_cpus=2, object_store_memory=120 * MB)
    cluster.wait_for_nodes()
    killer = NodeKiller(cluster, second_checkpoint_written)
    killer.start()
    try:
        summary = run(cfg)
    finally:
        killer.job_done.set()
    killer.join(timeout=30)
    assert killer.error is None, killer.error
    assert killer.killed_at is not None, "the node hosting a training worker was never killed"
    assert summary["steps"] == STEPS, summary
    model, _, meta = load_checkpoint(summary["checkpoint_uri"])
    assert meta["extra"]["step"] == STEPS and meta["extra"]["job"] == "pretrain"
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.timestamp, m.step))
    restarts = sorted(client.get_metric_history(run_id, "train/resumed_from_step"), key=lambda m: m.timestamp)
    resumed = [int(m.value) for m in restarts]
    logged = [m.step for m in history]
    # the lost workers were restarted from the latest complete checkpoint (4 or later, whether or not Ray Train's
    # controller had registered it before the node died, training/resume.py), not from step 1
    assert len(resumed) == 1 and resumed[0] in range(4, STEPS, 2), resumed
    first_after = next(m.step for m in history if m.timestamp >= restarts[0].timestamp)
    assert first_after == resumed[0] + 1, (logged, resumed)
    assert logged[0] == 1 and all(b <= a + 1 for a, b in zip(logged, logged[1:])), f"a gap: {logged}"
    assert sorted(set(logged)) == list(range(1, STEPS + 1)), f"step numbers not continuous: {logged}"
    assert summary["pruned_checkpoints"] == sorted(summary["pruned_checkpoints"])
    left = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert left == [f"checkpoint_{s:08d}" for s in (STEPS - 2, STEPS)], left  # keep_checkpoints = 2
