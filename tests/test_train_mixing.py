"""Mixed batches (issue 16 item 1), without Ray: the variant spread, the per-epoch row-group plan and the cached
mix. The Ray Data datasource itself runs in tests/test_train_progress.py (a streamed, mixed pretraining run);
benchmarks/bench_mixing.py measures the batches against random sampling."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from training.data import mix_tables, mixed_unit_groups, spread_variants
from vosr.config import config_from_dict


def _shard(src: int, images: int, variants: int) -> pa.Table:
    return pa.table({"id": [f"s{src:02d}_i{i:03d}" for i in range(images) for _ in range(variants)],
                     "variant": pa.array([v for _ in range(images) for v in range(variants)], pa.int32()),
                     "source": [src] * (images * variants)})


def test_defaults_mix_and_buffer_like_the_reference():
    tc = config_from_dict({"preset": "vosr-0.5b"}).train
    assert tc.mix_shards is True and tc.shuffle_buffer >= 2000


def test_spread_variants_puts_an_images_variants_far_apart_and_keeps_every_row():
    t = _shard(0, 50, 4)
    out = spread_variants(t, seed=3)
    ids = out.column("id").to_pylist()
    assert sorted(zip(ids, out.column("variant").to_pylist())) == sorted(
        zip(t.column("id").to_pylist(), t.column("variant").to_pylist()))
    pos: dict[str, list[int]] = {}
    for k, i in enumerate(ids):
        pos.setdefault(i, []).append(k)
    assert min(b - a for p in pos.values() for a, b in zip(p, p[1:])) >= 40  # rows / K = 50 apart, give or take
    assert all(a != b for a, b in zip(ids, ids[1:]))
    assert spread_variants(t, seed=3).equals(out) and not spread_variants(t, seed=4).equals(out)


def test_row_group_plan_is_a_seeded_permutation_new_every_epoch_with_distinct_shards_per_block():
    files = np.repeat(np.arange(20), 5)  # 20 shards x 5 row groups
    g0 = mixed_unit_groups(files, seed=1, epoch=0, group=16)
    assert sorted(np.concatenate(g0).tolist()) == list(range(100)) and len(g0) == 7
    again = mixed_unit_groups(files, seed=1, epoch=0, group=16)
    assert all(np.array_equal(a, b) for a, b in zip(g0, again))
    g1 = mixed_unit_groups(files, seed=1, epoch=1, group=16)
    assert not np.array_equal(np.concatenate(g0), np.concatenate(g1))
    assert all(len(set(files[g].tolist())) == len(g) for g in g0[:-1])  # each block: 16 different shards


def test_mixed_blocks_hold_many_sources_like_random_batches():
    tables = [_shard(s, 16, 4) for s in range(16)]  # 16 sources x 64 rows, sorted by (id, variant)
    blocks = mix_tables(tables, seed=0, rows_per_unit=16, group=16)
    rows = pa.concat_tables(blocks)
    assert rows.num_rows == 1024 and len(set(zip(rows.column("id").to_pylist(),
                                                 rows.column("variant").to_pylist()))) == 1024
    src = np.asarray(rows.column("source").to_pylist())
    distinct = [len(set(src[i:i + 16])) for i in range(0, 1024, 16)]
    random = 16 * (1 - (15 / 16) ** 16)  # expected distinct of 16 uniform draws from 16 sources: 10.3
    assert np.mean(distinct) > 0.85 * random
    plain = np.asarray(pa.concat_tables(tables).column("source").to_pylist())
    assert np.mean([len(set(plain[i:i + 16])) for i in range(0, 1024, 16)]) == 1.0  # what file order gives
