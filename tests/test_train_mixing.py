"""Mixed batches: without Ray, the variant spread, the per-epoch row-group plan, the cached mix
and the worker's shuffle buffer (spread_batches: same-image pairs per batch at or below random sampling); with one
module Ray, BatchStream's epochs and resume and the streamed datasource over real Parquet shards.
benchmarks/bench_mixing.py measures the batches against random sampling at 2x and 8x the buffer."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from jobkit.config import config_from_dict
from training.data import mix_tables, mixed_unit_groups, spread_batches, spread_variants


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


def _pairs_and_distinct(batches: list[pa.Table]) -> tuple[float, float]:
    pairs, distinct = [], []
    for b in batches:
        _, counts = np.unique(np.asarray(b.column("id").to_pylist()), return_counts=True)
        pairs.append(int((counts * (counts - 1) // 2).sum()))
        distinct.append(len(set(b.column("source").to_pylist())))
    return float(np.mean(pairs)), float(np.mean(distinct))


def test_spread_batches_keep_an_images_variants_apart_at_or_below_random_sampling():
    """Blocks as the mixed read hands them over (every block holds all 4 variants of its images, 16 sources) and a
    buffer 8x smaller than the data: a plain shuffle buffer (look-ahead 1, no skipping) puts two rows of one image
    in a batch several times as often as random sampling over the whole set; spread_batches stays at or below
    random's C(16,2) (K-1)/(N-1), keeps distinct sources per batch near random's, and emits every row once."""
    tables = [_shard(s, 64, 4) for s in range(16)]  # 4096 rows
    blocks = mix_tables(tables, seed=0, rows_per_unit=16, group=16)  # blocks of 256 rows
    n = 4096
    random_pairs = math.comb(16, 2) * 3 / (n - 1)  # 0.088 per batch
    random_distinct = 16 * (1 - math.comb(n - 256, 16) / math.comb(n, 16))  # 10.3
    plain, spread = [], []
    for seed in range(3):  # 3 x 256 batches
        plain += list(spread_batches(blocks, 16, 512, seed, lookahead=1))
        out = list(spread_batches(blocks, 16, 512, seed))
        rows = pa.concat_tables(out)
        assert len(out) == n // 16 and all(b.num_rows == 16 for b in out)
        assert len(set(zip(rows.column("id").to_pylist(), rows.column("variant").to_pylist()))) == n
        spread += out
    plain_pairs, _ = _pairs_and_distinct(plain)
    spread_pairs, spread_distinct = _pairs_and_distinct(spread)
    assert plain_pairs > 3 * random_pairs, plain_pairs  # the check has teeth: a plain buffer clusters variants
    assert spread_pairs <= random_pairs, (spread_pairs, random_pairs)
    assert spread_distinct >= 0.9 * random_distinct, spread_distinct


def test_spread_batches_are_deterministic_per_seed_and_drop_only_a_partial_last_batch():
    blocks = mix_tables([_shard(s, 10, 3) for s in range(5)], seed=1, rows_per_unit=6, group=4)  # 150 rows
    a = [b.column("id").to_pylist() for b in spread_batches(blocks, 16, 40, seed=7)]
    assert a == [b.column("id").to_pylist() for b in spread_batches(blocks, 16, 40, seed=7)]
    assert a != [b.column("id").to_pylist() for b in spread_batches(blocks, 16, 40, seed=8)]
    assert len(a) == 150 // 16
    assert list(spread_batches([blocks[0].slice(0, 15)], 16, 40, seed=7)) == []  # fewer rows than a batch: nothing


def _feature_blocks(images: int, variants: int, per_block: int) -> list[pa.Table]:
    """Feature-schema rows whose hr_latent holds the row number, sorted by (id, variant) as shards are."""
    import torch

    from pipelines.features.schema import feature_schema, tensor_to_arrow

    n = images * variants
    idx = torch.arange(n, dtype=torch.float32)
    table = pa.table({"id": [f"img{i:03d}" for i in range(images) for _ in range(variants)],
                      "variant": pa.array([v for _ in range(images) for v in range(variants)], pa.int32()),
                      "seed": pa.array(range(n), pa.int64()),
                      "crop_box": [[0, 0, 2, 2]] * n, "image_size": [[2, 2]] * n,
                      "hr_latent": tensor_to_arrow(idx.view(n, 1, 1, 1).expand(n, 1, 2, 2), "float32"),
                      "lr_latent": tensor_to_arrow(torch.zeros(n, 1, 2, 2), "float32"),
                      "sem_tokens": tensor_to_arrow(torch.zeros(n, 2, 2), "float32"),
                      "degrade_params": ["{}"] * n},
                     schema=feature_schema((1, 2, 2), (2, 2), "float32"))
    return [table.slice(i, per_block) for i in range(0, n, per_block)]


def test_batch_stream_epochs_cover_every_row_differ_and_resume_at_the_saved_position(ray_local):
    """training.data.BatchStream over a real Ray dataset: each epoch yields every row once in new batches, no
    batch holds two variants of an image, and a stream opened at a saved (epoch, batch_in_epoch) continues with
    the batches the uninterrupted stream produced."""
    from training.data import BatchStream

    ds = ray_local.data.from_arrow(_feature_blocks(64, 4, 64))  # 256 rows in blocks holding whole images

    def rows(stream, k):
        return [tuple(int(x) for x in next(stream)["hq"][:, 0, 0, 0]) for _ in range(k)]

    stream = BatchStream(ds.iterator(), 8, seed=3, rank=0, shuffle_buffer=64, device="cpu")
    first = rows(stream, 32 + 10)  # epoch 0 (32 batches), then 10 batches of epoch 1
    assert (stream.epoch, stream.batch_in_epoch) == (1, 10)
    for epoch in (first[:32], first[32:]):
        flat = [r for b in epoch for r in b]
        assert len(flat) == len(set(flat))
        assert all(len({r // 4 for r in b}) == 8 for b in epoch)  # row // 4 is the image
    assert sorted(r for b in first[:32] for r in b) == list(range(256))
    assert first[32:] != first[:10]
    resumed = BatchStream(ds.iterator(), 8, seed=3, rank=0, shuffle_buffer=64, device="cpu", epoch=1,
                          batch_in_epoch=4)
    assert rows(resumed, 6) == first[36:42]
    stream.close()
    resumed.close()


def test_streamed_mixed_shards_feed_batches_of_many_shards_every_row_once_per_epoch(ray_local, tmp_path):
    """mixed_shards_datasource over Parquet shards written as precompute writes them (one source each, sorted by
    (id, variant), row groups of whole images), through BatchStream: every epoch yields each row once, no batch
    holds two variants of an image, batches draw on many shards, and the two epochs' orders differ."""
    import pyarrow.parquet as pq

    from training.data import BatchStream, read_mixed_shards

    uris = []
    for s in range(8):  # 8 shards x 8 images x 4 variants, row groups of 16 rows
        table = _feature_blocks(8, 4, 32)[0]
        table = table.set_column(0, "id", pa.array([f"s{s}_{i}" for i in table.column("id").to_pylist()]))
        path = tmp_path / f"shard-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=16)
        uris.append(str(path))
    ds = read_mixed_shards(uris, "", seed=0, group=8)
    stream = BatchStream(ds.iterator(), 8, seed=0, rank=0, shuffle_buffer=64, device="cpu")

    def batch():
        b = next(stream)
        return list(zip(b["ids"], b["hq"][:, 0, 0, 0].int().tolist()))

    epochs = [[batch() for _ in range(32)] for _ in range(2)]
    stream.close()
    assert stream.epoch == 1
    random_distinct = 8 * (1 - math.comb(224, 8) / math.comb(256, 8))  # 8 rows from 8 shards of 32 rows: 5.3
    random_pairs = math.comb(8, 2) * 3 / 255  # same-image pairs per batch of 8 from 256 rows, K = 4: 0.33
    for batches in epochs:
        assert len({r for b in batches for r in b}) == 256  # every row once
        pairs = [8 - len({i for i, _ in b}) for b in batches]  # images twice in a batch (the drain may force one)
        assert np.mean(pairs) <= random_pairs, pairs
        assert np.mean([len({i.split("_")[0] for i, _ in b}) for b in batches]) >= 0.9 * random_distinct
    assert epochs[0] != epochs[1]
