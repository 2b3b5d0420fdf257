"""Feature precompute on Ray Data (tiny preset, real photos): materialised shards, online mode equality, resume
after a fault, metadata compatibility checks. Starts a real local Ray (ray_local fixture)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobkit.config import config_from_dict
from pipelines.curate_schema import CURATED_SCHEMA
from pipelines.features import schema as fsch
from tests.helpers.s3_fixture import s3_server
from tests.helpers.train_data import encoded_batch
from vosr import storage

K = 2


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as site:
        yield site


@pytest.fixture(scope="module")
def curated(tmp_path_factory, photos, s3):
    """Curated shards (CURATED_SCHEMA) in S3 (real moto server on loopback): 5 real photos at small sizes (one
    below the crop size), one corrupt image and one dropped duplicate row, in two shards."""
    rows = []
    for i, p in enumerate(photos[:5]):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((48, 48) if i == 0 else (120, 120))
        data = _png(im)
        rows.append({"id": hashlib.sha256(data).hexdigest()[:16], "source": str(p), "image": data, "format": "png",
                     "width": im.size[0], "height": im.size[1], "kept": True})
    rows.insert(2, {"id": "corrupt0", "source": "x", "image": b"this is not an image", "format": "png",
                    "width": 10, "height": 10, "kept": True})
    rows.append({"id": "dup0", "source": "y", "image": None, "kept": False, "duplicate_of": rows[0]["id"],
                 "drop_reason": "duplicate"})
    for i, part in enumerate((rows[:4], rows[4:])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part, schema=CURATED_SCHEMA), buf)
        s3.put_bytes(buf.getvalue(), f"curated/shards/part-{i:05d}.parquet")
    return s3.uri("curated"), rows


def _cfg(curated_root, out, local, endpoint="", mlflow: bool = False, **pre):
    return config_from_dict({
        "preset": "tiny",
        "run": {"seed": 3, "mlflow": {"enabled": mlflow}, "output_root": str(local)},
        "precompute": {"input": str(curated_root), "output": str(out), "variants": K, "batch_size": 4,
                       "degrade_batch_size": 2, "s3_endpoint_url": endpoint, **pre},
    })


def _read(out: str, ep: str, name: str | None = None) -> pa.Table:
    files = storage.list_files(storage.join(out, "shards"), ".parquet", ep)
    if name:
        files = [f for f in files if f.endswith("/" + name)]
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f, ep))) for f in files])


def _json(uri: str, ep: str) -> dict:
    return json.loads(storage.read_bytes(uri, ep))


class DriverGuard:
    """Instruments, in this (the driver's) process, every Ray Data method that brings rows to the caller. Records
    each call and the columns and bytes of every batch it hands out."""

    FETCHERS = ("iter_rows", "take", "take_all", "take_batch", "to_pandas", "to_arrow_refs", "iter_torch_batches",
                "to_numpy_refs", "show", "materialize")

    def __init__(self, mp: pytest.MonkeyPatch):
        import ray.data

        self.calls: list[str] = []
        self.batches: list[tuple[tuple[str, ...], int]] = []
        real_iter = ray.data.Dataset.iter_batches
        guard = self

        def iter_batches(ds, *a, **kw):
            guard.calls.append("iter_batches")
            for b in real_iter(ds, *a, **kw):
                cols = tuple(b.column_names) if isinstance(b, pa.Table) else tuple(b)
                guard.batches.append((cols, int(b.nbytes) if isinstance(b, pa.Table) else -1))
                yield b

        mp.setattr(ray.data.Dataset, "iter_batches", iter_batches)
        for name in self.FETCHERS:
            real = getattr(ray.data.Dataset, name)
            mp.setattr(ray.data.Dataset, name, self._recorder(name, real))

    def _recorder(self, name, real):
        def wrapper(ds, *a, **kw):
            self.calls.append(name)
            return real(ds, *a, **kw)
        return wrapper


@pytest.fixture(scope="module")
def materialised(s3, ray_local, curated, tmp_path_factory):
    """The precompute job on s3:// in and out, killed by fault injection after its first shard, then re-run to
    completion. (s3 starts before Ray so the workers inherit its test credentials.) Both runs under DriverGuard,
    with the plan's row counting in tasks (one shard per task)."""
    from jobkit.faults import FaultInjected
    from pipelines.features.job import run

    local = tmp_path_factory.mktemp("run")
    out, ep = s3.uri("features"), s3.endpoint_url
    with pytest.MonkeyPatch.context() as mp:
        guard = DriverGuard(mp)
        mp.setattr("pipelines.features.job.PLAN_FILES_PER_TASK", 1)  # plan counts kept rows in Ray tasks too
        with pytest.raises(FaultInjected):
            run(_cfg(curated[0], out, local, ep, fail_after_shards=1), log=lambda s: None)
        interrupted = {"keys": s3.keys("features/shards/"), "first": _read(out, ep, "part-00000.parquet"),
                       "parts": s3.keys("features/_parts/")}
        lines: list[str] = []
        summary = run(_cfg(curated[0], out, local, ep, mlflow=True), log=lines.append)  # tracked in local/mlflow.db
    cfg = _cfg(curated[0], out, local, ep)
    return cfg, out, summary, lines, interrupted, local, guard


def test_materialised_shards_rows_and_summary(materialised, curated):
    cfg, out, summary, lines, _, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    rows = curated[1]
    good = [r for r in rows if r["kept"] and r["id"] != "corrupt0"]
    second = [r for r in rows[4:] if r["kept"]]
    assert summary["shards_written"] == 1 and summary["rows"] == len(second) * K
    assert any("shard part-00001.parquet" in ln for ln in lines)  # progress is visible
    assert _json(storage.join(out, "summary.json"), ep)["rows"] == len(second) * K
    assert set(summary["stored_bytes_per_row_by_column"]) >= {"hr_latent", "lr_latent", "sem_tokens"}
    stats = _json(storage.join(out, "shards", "part-00000.stats.json"), ep)
    assert stats["failed_rows_by_reason"] == {"decode:not_image": K}
    table = _read(out, ep)
    keys = list(zip(table.column("id").to_pylist(), table.column("variant").to_pylist()))
    assert sorted(keys) == sorted((r["id"], v) for r in good for v in range(K))
    meta = fsch.read_metadata(out, ep)
    assert meta["variants"] == K and meta["resolution"] == 64 and meta["dtype"] == "float16"
    assert meta["autoencoder"]["name"] == "pixel" and len(meta["autoencoder"]["weights_sha256"]) == 64
    assert meta["semantic"]["name"] == "tiny_vit" and meta["latent_shape"] == [48, 16, 16]


def test_rows_match_direct_library_computation(materialised, curated):
    """Every stored tensor equals what the method library gives for that (id, variant, seed), computed here
    without Ray: seeded crop -> seeded degradation -> encode_views."""
    from vosr.degrade import degrade, random_crop
    from vosr.encoders import build_autoencoder, build_semantic_encoder
    from vosr.features import encode_views
    from vosr.seeding import sample_seed

    cfg, out, _, _, _, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    table = _read(out, ep)
    dec = fsch.decode_feature_rows(table)
    by_id = {r["id"]: r for r in curated[1]}
    ae, sem = build_autoencoder(cfg.autoencoder), build_semantic_encoder(cfg.semantic)
    for i in range(table.num_rows):
        sid, v = dec["id"][i], int(dec["variant"][i])
        img = Image.open(io.BytesIO(by_id[sid]["image"])).convert("RGB")
        crop, box = random_crop(img, 64, sample_seed(3, sid, v, "crop"))
        seed = sample_seed(3, sid, v, "degrade")
        assert int(dec["seed"][i]) == seed and table.column("crop_box")[i].as_py() == box
        hr = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        lr, params = degrade(hr, [seed], cfg.degrade)
        assert json.loads(table.column("degrade_params")[i].as_py()) == json.loads(json.dumps(params[0]))
        hz, lz, tok = encode_views(ae, sem, hr, lr)
        assert torch.equal(dec["hr_latent"][i], hz[0].half().float())  # pixel codec: exact
        assert torch.equal(dec["lr_latent"][i], lz[0].half().float())  # identical degraded bytes
        assert torch.allclose(dec["sem_tokens"][i], tok[0].half().float(), atol=2e-3, rtol=2e-3)
    small = [r for r in curated[1] if r.get("width") and r["width"] < 64]
    assert small  # the 48 px photo was upscaled to the crop size, not dropped
    assert small[0]["id"] in dec["id"]


def test_online_equals_materialised(materialised, ray_local):
    from pipelines.features.online import online_dataset, online_metadata

    cfg, out, _, _, _, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    ds = online_dataset(cfg)
    batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    online = pa.concat_tables(batches).sort_by([("id", "ascending"), ("variant", "ascending")])
    stored = _read(out, ep).sort_by([("id", "ascending"), ("variant", "ascending")])
    assert online.num_rows == stored.num_rows
    for col in ("id", "variant", "seed", "crop_box", "image_size", "degrade_params"):
        assert online.column(col).to_pylist() == stored.column(col).to_pylist(), col
    a = fsch.decode_feature_rows(online, online_metadata(cfg))
    b = fsch.decode_feature_rows(stored)
    for col in fsch.TENSOR_COLUMNS:
        assert torch.allclose(a[col], b[col], atol=1e-3, rtol=1e-3), col
    assert torch.equal(a["lr_latent"], b["lr_latent"])  # same degraded bytes through the exact pixel codec


def test_fault_mid_run_then_resume_gives_same_shards(materialised, curated):
    """The killed run left exactly one complete shard (plus its stats) and no partial object; the re-run skipped
    it, wrote the other and left the first untouched; all rows equal the direct library computation (test above)
    and the online mode."""
    from pipelines.features.job import run

    cfg, out, summary, _, interrupted, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    assert interrupted["keys"] == ["features/shards/part-00000.parquet", "features/shards/part-00000.stats.json"]
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 1
    assert summary["images"] == len({r["id"] for r in curated[1][4:] if r["kept"]})
    assert _read(out, ep, "part-00000.parquet").equals(interrupted["first"])
    again = run(cfg, log=lambda s: None)
    assert again["shards_skipped"] == 2 and again["shards_written"] == 0


def test_no_row_batch_reaches_the_driver(materialised, s3):
    """Rows stay out of the driver: during both runs the driver iterated only the part summaries (shard, part uri, rows), a few
    hundred bytes each; it never took, listed or converted rows. The transient parts were removed at the end."""
    from pipelines.features.writer import PART_SUMMARY_SCHEMA, SHARDS_DIR

    assert SHARDS_DIR == fsch.SHARDS_DIR  # the torch-free writer module repeats the constant
    *_, interrupted, _, guard = materialised
    assert guard.calls and set(guard.calls) == {"iter_batches"}, guard.calls
    assert guard.batches and {cols for cols, _ in guard.batches} == {tuple(PART_SUMMARY_SCHEMA.names)}
    assert max(n for _, n in guard.batches) < 4096
    assert interrupted["parts"]  # the killed run left parts behind (written by tasks, outside shards/) ...
    assert s3.keys("features/_parts/") == []  # ... and the finished run cleaned them up


def test_task_written_shards_equal_driver_side_assembly(materialised, curated, one_torch_thread):
    """The shards written by tasks equal the previous driver-side path, recomputed here without Ray: the same
    stage functions over each curated shard, all rows concatenated, failed rows counted and dropped, sorted by
    (id, variant), cast to the schema."""
    from pipelines.features.stages import Encoder, make_pairs

    cfg, out, _, _, _, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    schema = fsch.schema_for_config(cfg)
    encoder = Encoder(cfg.to_dict())
    for i in range(2):
        name = f"part-{i:05d}.parquet"
        src = pq.read_table(io.BytesIO(storage.read_bytes(f"{cfg.precompute.input}/shards/{name}", ep)))
        batch = {"id": np.array(src.column("id").to_pylist(), dtype=object),
                 "image": np.array(src.column("image").to_pylist(), dtype=object),
                 "path": np.array([f"bucket/curated/shards/{name}"] * src.num_rows, dtype=object),
                 "kept": np.array(src.column("kept").to_pylist(), dtype=bool)}
        enc = encoder(make_pairs(batch, cfg.to_dict(), list(range(K))))
        failed: dict[str, int] = {}
        for e in enc.column("error").to_pylist():
            if e:
                failed[e] = failed.get(e, 0) + 1
        old = enc.filter(pa.compute.equal(enc.column("error"), "")).sort_by([("id", "ascending"),
                                                                              ("variant", "ascending")])
        old = old.drop_columns(["src", "error"]).cast(schema)
        new = _read(out, ep, name)
        assert new.schema.names == old.schema.names and new.num_rows == old.num_rows > 0
        for col in ("id", "variant", "seed", "crop_box", "image_size", "degrade_params", "hr_latent", "lr_latent"):
            assert new.column(col).to_pylist() == old.column(col).to_pylist(), (name, col)
        a, b = fsch.decode_feature_rows(new), fsch.decode_feature_rows(old)
        assert torch.allclose(a["sem_tokens"], b["sem_tokens"], atol=2e-3, rtol=2e-3)  # batch composition only
        assert _json(storage.join(out, "shards", name.replace(".parquet", ".stats.json")), ep)[
            "failed_rows_by_reason"] == failed


def test_command_line_entry_point(materialised, capsys):
    """`python pipelines/precompute.py --config configs/precompute/tiny.yaml --set ...` (here on the finished
    output: everything is skipped, the summary JSON is printed)."""
    from pipelines.precompute import main

    cfg, out, _, _, _, local, _ = materialised
    rc = main(["--config", "configs/precompute/tiny.yaml", "--set", f"precompute.input={cfg.precompute.input}",
               "--set", f"precompute.output={out}", "--set", "precompute.s3_endpoint_url="
               f"{cfg.precompute.s3_endpoint_url}", "--set", "run.seed=3", "--set", "precompute.variants=2",
               "--set", f"run.output_root={local}", "--set", "run.mlflow.enabled=false"])
    assert rc == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("\n{") + 1:])
    assert printed["shards_skipped"] == 2 and printed["shards_written"] == 0 and printed["output"] == out


def test_mlflow_run_logged(materialised):
    import mlflow

    cfg, out, summary, _, _, local, _ = materialised
    mlflow.set_tracking_uri(f"sqlite:///{local / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vosr"], output_format="list")
    assert len(runs) == 1
    r = runs[0]
    assert r.data.params["precompute.variants"] == str(K)
    assert r.data.metrics["rows"] == summary["rows"] and r.data.metrics["shards_skipped"] == 1


def test_mismatched_features_are_refused(materialised, curated):
    from pipelines.features.job import ensure_metadata, run

    cfg, out, _, _, _, _, _ = materialised
    ep = cfg.precompute.s3_endpoint_url
    meta = fsch.read_metadata(out, ep)
    fsch.check_compatible(meta, cfg)  # the config it was made with passes
    with pytest.raises(fsch.FeatureMismatchError, match="semantic.layer"):
        fsch.check_compatible(meta, cfg.replace(
            semantic=config_from_dict({"semantic": {"layer": 1}}).semantic))
    with pytest.raises(fsch.FeatureMismatchError, match="data.resolution"):
        fsch.check_compatible(meta, config_from_dict({"preset": "tiny", "data": {"resolution": 128}}))
    with pytest.raises(fsch.FeatureMismatchError, match="autoencoder.name"):
        fsch.check_compatible(meta, config_from_dict({"preset": "vosr-0.5b"}))
    other_sem = dict(meta["semantic"], weights_sha256="0" * 64)
    with pytest.raises(fsch.FeatureMismatchError, match="semantic.weights_sha256"):
        fsch.check_compatible(meta, cfg, meta["autoencoder"], other_sem)
    with pytest.raises(fsch.FeatureMismatchError, match="latent scaling"):
        fsch.check_compatible(meta, cfg, dict(meta["autoencoder"], scaling="latent = x * 2"), meta["semantic"])
    # a resumed run into the same output with another K or seed is refused before anything is written
    with pytest.raises(fsch.FeatureMismatchError, match="variants"):
        ensure_metadata(cfg.replace(precompute=dataclasses.replace(cfg.precompute, variants=3)),
                        meta["autoencoder"], meta["semantic"])
    with pytest.raises(ValueError, match="online"):
        run(cfg.replace(precompute=dataclasses.replace(cfg.precompute, mode="online")))


def test_writer_tasks_parts_then_merge(tmp_path):
    """The two writing tasks without Ray: parts per source shard with content-derived names (a retried task
    rewrites the same file), then the merge sorts, counts failed rows, writes stats + shard, removes the parts
    (stale ones of a killed run too)."""
    from pipelines.features import writer as fw

    out = str(tmp_path / "features")
    cfg = config_from_dict({"preset": "tiny", "precompute": {"output": out}})
    b1 = encoded_batch(cfg, [("b", 1, "x/curated/shards/part-00001.parquet", ""),
                              ("a", 0, "x/curated/shards/part-00000.parquet", ""),
                              ("c", 0, "x/curated/shards/part-00001.parquet", "decode:not_image")])
    b2 = encoded_batch(cfg, [("b", 0, "x/curated/shards/part-00001.parquet", "")])
    s1 = fw.write_parts(b1, out)
    assert s1.schema == fw.PART_SUMMARY_SCHEMA and s1.column("shard").to_pylist() == ["part-00000.parquet",
                                                                                      "part-00001.parquet"]
    assert s1.column("rows").to_pylist() == [1, 2]
    assert fw.write_parts(b1, out).equals(s1)  # a retry: same names, same files
    s2 = fw.write_parts(b2, out)
    stale = tmp_path / "features" / "_parts" / "part-00001" / "stale.parquet"
    stale.write_bytes(b"left by a killed run")
    assert len(list((tmp_path / "features" / "_parts").rglob("*.parquet"))) == 4
    parts = [u for u, sh in zip(s1.column("part").to_pylist() + s2.column("part").to_pylist(),
                                s1.column("shard").to_pylist() + s2.column("shard").to_pylist())
             if sh == "part-00001.parquet"]
    settings = fw.writer_settings(cfg)
    stats = fw.finalize_shard(settings, "part-00001.parquet", parts)
    assert stats["rows"] == 2 and stats["images"] == 1 and stats["failed_rows_by_reason"] == {"decode:not_image": 1}
    shard = pq.read_table(tmp_path / "features" / "shards" / "part-00001.parquet")
    assert shard.schema.names == fsch.schema_for_config(cfg).names
    assert list(zip(shard.column("id").to_pylist(), shard.column("variant").to_pylist())) == [("b", 0), ("b", 1)]
    assert shard.column("seed").to_pylist() == [0, 0]  # b2's row 0 first, then b1's row 0 (seed = row index)
    assert json.loads((tmp_path / "features" / "shards" / "part-00001.stats.json").read_text())["rows"] == 2
    assert not (tmp_path / "features" / "_parts" / "part-00001").exists() or not any(
        (tmp_path / "features" / "_parts" / "part-00001").iterdir())
    assert len(list((tmp_path / "features" / "_parts").rglob("*.parquet"))) == 1  # shard 0's part is untouched
    assert fw.remove_parts(out) == 1


def test_bf16_storage_roundtrip_is_bit_exact():
    x = torch.randn(3, 4, 2, 2)
    arr = fsch.tensor_to_arrow(x, "bfloat16")
    s = fsch.feature_schema((4, 2, 2), (2, 3), "bfloat16")
    assert s.field("hr_latent").type == arr.type and arr.type.value_type == pa.uint16()
    vals = np.asarray(arr.flatten()).reshape(3, -1)
    back = fsch._decode_tensor(vals, (4, 2, 2), "bfloat16")
    assert torch.equal(back, x.to(torch.bfloat16).float())


def test_decode_numpy_batches_as_ray_hands_them_out():
    """Ray Data's batch_format="numpy" renders fixed-size-list columns as object arrays of 1-D arrays."""
    x = torch.randn(3, 4, 2, 2)
    y = torch.randn(3, 2, 3)
    obj = lambda t: np.array([r for r in t.reshape(3, -1).half().numpy()] + [None], dtype=object)[:3]  # noqa: E731
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "variant": np.array([0, 1, 0], np.int32),
             "seed": np.array([5, 6, 7], np.int64), "hr_latent": obj(x), "lr_latent": obj(x), "sem_tokens": obj(y)}
    meta = {"latent_shape": [4, 2, 2], "sem_shape": [2, 3], "dtype": "float16"}
    d = fsch.decode_feature_rows(batch, meta)
    assert torch.equal(d["hr_latent"], x.half().float()) and torch.equal(d["sem_tokens"], y.half().float())
    assert d["id"] == ["a", "b", "c"] and d["seed"].tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="metadata"):
        fsch.decode_feature_rows(batch)
    # an Arrow batch whose field metadata was dropped on the way decodes with the dataset metadata
    bare = pa.table({"id": ["a", "b", "c"], "variant": pa.array([0, 1, 0], pa.int32()), "seed": [5, 6, 7],
                     "hr_latent": fsch.tensor_to_arrow(x, "float16"), "lr_latent": fsch.tensor_to_arrow(x, "float16"),
                     "sem_tokens": fsch.tensor_to_arrow(y, "float16")})
    assert torch.equal(fsch.decode_feature_rows(bare, meta)["lr_latent"], x.half().float())
    with pytest.raises(ValueError, match="vosr.shape"):
        fsch.decode_feature_rows(bare)


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    from pipelines.precompute import main

    rc = main(["--config", "configs/precompute/tiny.yaml", "--set", f"precompute.input={tmp_path / 'none'}",
               "--set", f"precompute.output={tmp_path / 'out'}", "--set", "run.mlflow.enabled=false"])
    assert rc == 1
    assert "no curated shards under" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
