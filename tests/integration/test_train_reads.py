"""Training reads of feature shards (training/data.py): only finished shards are read (never the `_parts/` a
running or killed precompute leaves), and a read task's work is cut to its block target (train.read_block_mb)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobkit.config import config_from_dict
from pipelines.features import schema as fsch
from pipelines.features import writer as fw
from tests.helpers.train_data import encoded_batch


@pytest.fixture(scope="module")
def features_with_leftover_parts(tmp_path_factory):
    """A features root as a precompute killed mid-run leaves it: two finished shards (written by the real part +
    merge tasks) and, under `_parts/`, parts of a third shard and stale parts of a finished one (duplicates of
    its rows, a failed row, the `error` column)."""
    from vosr.encoders import build_autoencoder, build_semantic_encoder

    out = tmp_path_factory.mktemp("features")
    cfg = config_from_dict({"preset": "tiny", "precompute": {"output": str(out), "dtype": "float16"},
                            "train": {"features": str(out)}, "data": {"holdout_fraction": 0.3},
                            "run": {"mlflow": {"enabled": False}}})
    src = "c/shards/part-{:05d}.parquet"
    rows = {s: [(f"s{s}i{i}", v, src.format(s), "") for i in range(6) for v in range(2)] for s in range(3)}
    settings = fw.writer_settings(cfg)
    for s in (0, 1):  # finished shards
        summary = fw.write_parts(encoded_batch(cfg, rows[s]), str(out), row_group_size=4)
        fw.finalize_shard(settings, f"part-{s:05d}.parquet", summary.column("part").to_pylist())
    # leftovers: shard 2 in flight, and shard 1 parts written again by a retried task of a killed run
    fw.write_parts(encoded_batch(cfg, rows[2] + [("s2bad", 0, src.format(2), "decode:not_image")]), str(out))
    fw.write_parts(encoded_batch(cfg, rows[1][:5]), str(out))
    fsch.write_metadata(str(out), fsch.build_metadata(cfg, build_autoencoder(cfg.autoencoder).identity(),
                                                      build_semantic_encoder(cfg.semantic).identity()))
    assert len(list((out / "_parts").rglob("*.parquet"))) == 2
    want = sorted((r[0], r[1]) for s in (0, 1) for r in rows[s])
    return cfg, out, want


def _keys(ds) -> list[tuple[str, int]]:
    out = []
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert "error" not in b.column_names
        out += list(zip(b.column("id").to_pylist(), b.column("variant").to_pylist()))
    return out


@pytest.mark.parametrize("mix,cache", [(True, False), (False, False), (True, True)])
def test_training_reads_only_finished_shards_never_leftover_parts(ray_local, features_with_leftover_parts, mix,
                                                                   cache):
    """Train + held-out rows are exactly the shards' rows, whatever `_parts/` holds, for the streamed mixed
    read, the stored-order read and the cached read."""
    from training.data import training_datasets

    cfg, _, want = features_with_leftover_parts
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, mix_shards=mix, cache_data=cache))
    train, val, info = training_datasets(cfg)
    assert info["shards"] == 2
    got_train = _keys(train)
    got_val = _keys(val)  # the first variant of held-out images
    held_out = {i for i, _ in got_val}
    assert sorted(got_train + [(i, v) for i, v in want if i in held_out]) == want
    assert len(got_train) == len(set(got_train)) and held_out and all(v == 0 for _, v in got_val)


def test_precompute_consumers_list_finished_shards_only(features_with_leftover_parts):
    """The precompute plan's resume listing and the feature listing every reader uses see shards/ only."""
    from pipelines.features.job import plan

    cfg, out, _ = features_with_leftover_parts
    assert [f.rsplit("/", 1)[1] for f in fw.shard_files(str(out))] == ["part-00000.parquet", "part-00001.parquet"]
    curated = out.parent / "curated-for-plan"
    (curated / "shards").mkdir(parents=True, exist_ok=True)
    from pipelines.curate_schema import CURATED_SCHEMA

    for s in range(3):
        pq.write_table(CURATED_SCHEMA.empty_table(), curated / "shards" / f"part-{s:05d}.parquet")
    p = plan(cfg.replace(precompute=dataclasses.replace(cfg.precompute, input=str(curated))))
    assert [f.rsplit("/", 1)[1] for f in p["done"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert [f.rsplit("/", 1)[1] for f in p["pending"]] == ["part-00002.parquet"]


def test_read_task_cuts_large_row_groups_to_its_block_target(tmp_path):
    """Row groups larger than the block target are read as slices; every row comes out once, in output blocks
    of at most 1/16 of the target, spread by variant; the stated peak stays under 2x the target (128 MiB and up;
    the measured peaks are benchmarks/bench_memory_reads.py's)."""
    from training import data as td

    n, width = 96, 8192  # 96 rows of 16 KiB (uint16), in row groups of 48 rows (768 KiB each)
    elem = pa.field("element", pa.uint16(), nullable=False)
    vals = np.arange(n * width, dtype=np.uint32).astype(np.uint16)
    table = pa.table({"id": [f"i{r // 2}" for r in range(n)], "variant": pa.array([r % 2 for r in range(n)],
                                                                                 pa.int32()),
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(vals), type=pa.list_(elem, width))})
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=48)
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    groups, row_bytes, _ = td._row_group_units([str(path)], fs)
    assert groups == [(0, 0, 48), (0, 1, 48)] and row_bytes == 64 + 64 + width * 2
    target = 32 * row_bytes  # a block target of 32 rows: smaller than a row group
    layout = td.read_layout(row_bytes, target)
    assert layout["batch_rows"] == 1 and layout["unit_rows"] == 32 and layout["out_rows"] == 2
    units = td.split_units(groups, layout["unit_rows"])
    assert units == [(0, 0, 0, 32), (0, 0, 32, 16), (0, 1, 0, 32), (0, 1, 32, 16)]
    seen = []
    for _f, g, first, rows in units:
        blocks = list(td._read_units_fn([(str(path), g, first, rows)], str(path), "", 7, layout)())
        assert all(b.num_rows <= layout["out_rows"] for b in blocks)
        got = pa.concat_tables(blocks)
        assert sorted(got.column("variant").to_pylist()) == got.column("variant").to_pylist()  # spread
        seen += got.column("id").to_pylist()
        x = np.asarray(got.column("x").combine_chunks().flatten()).reshape(-1, width)
        idx = [int(i[1:]) * 2 + v for i, v in zip(got.column("id").to_pylist(), got.column("variant").to_pylist())]
        assert np.array_equal(x[:, 0], vals.reshape(n, width)[idx, 0])  # each row's own values
    assert sorted(seen) == sorted(table.column("id").to_pylist())
    for mib in (128, 512, 4096):
        assert td.read_task_peak_bound(mib << 20) < 2 * (mib << 20)
