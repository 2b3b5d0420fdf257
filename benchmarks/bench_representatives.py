"""End to end: curating real photos plus their lossy re-encodes and mislabelled copies keeps every
original as the representative of its duplicate group.

    .venv/bin/python benchmarks/bench_representatives.py [--photos DIR] [--limit N]

Serves over a loopback HTTP server (tests/helpers/http_fixture.py) every photo (../shared/data/dev when present,
else assets/photos) under its true type and, per photo, copies: a JPEG re-encode below the original's quality, a
palette PNG, a CMYK JPEG, a lossy WebP, and the original's own bytes and a JPEG re-encode served under wrong
Content-Types (text/plain, application/octet-stream). Runs the real curate job (local Ray, 2 CPUs) and prints,
per photo, which member its group kept; exits 1 unless every original (or a byte-identical mislabelled copy of
it) is the kept representative and every copy is marked a duplicate.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # photos.py by file: a pip package may own `benchmarks`

from photos import photo_paths  # noqa: E402

from jobkit.config import config_from_dict  # noqa: E402
from pipelines import curate  # noqa: E402
from pipelines.curate_schema import shard_files  # noqa: E402
from tests.helpers.http_fixture import encode, http_server  # noqa: E402
from vosr.imageio import decode_image, jpeg_quality  # noqa: E402


def copies(path: Path, folder: Path) -> dict[str, Path]:
    """Kind -> file of the lossy copies of one photo (the server declares a type from the suffix)."""
    data = path.read_bytes()
    img = decode_image(data, 10**9)
    q = jpeg_quality(Image.open(io.BytesIO(data)).quantization) if data[:3] == b"\xff\xd8\xff" else 95
    blobs = {
        "jpeg.jpg": encode(img, "JPEG", quality=max(q - 10, 30)),
        "palette.png": encode(img.quantize(256)),
        "cmyk.jpg": encode(img.convert("CMYK"), "JPEG", quality=q),
        "webp.webp": encode(img, "WEBP", quality=80),            # served as image/png: mislabelled too
        "jpeg2.jpg": encode(img, "JPEG", quality=max(q - 5, 30)),  # served as application/octet-stream
    }
    out = {}
    for kind, blob in blobs.items():
        out[kind] = folder / f"{path.stem}__{kind}"
        out[kind].write_bytes(blob)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="")
    ap.add_argument("--limit", type=int, default=12)
    args = ap.parse_args()
    paths = (sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
             if args.photos else photo_paths())[: args.limit or None]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "copies").mkdir()
        made = {p.name: copies(p, tmp / "copies") for p in paths}
        served = list(paths) + [f for m in made.values() for f in m.values()]
        with http_server(served) as site:
            summary, rows, expect, took = _curate(site, paths, made, tmp)
            originals = {p.name: (site.photo_url(p.name), site.url(f"/mislabelled/text/plain/{p.name}"))
                         for p in paths}
    by_id = {r["id"]: r for r in rows}
    print(f"[bench_representatives] {len(paths)} photos, {len(expect)} URLs, curated in {took:.1f}s; "
          f"ok {summary['ok']}, duplicates {summary['duplicates']}, kept {summary['kept']}, "
          f"failed {summary['failed']}, filtered {summary['filtered']}")
    print(f"declared types of the decoded images: {summary.get('ok_by_declared_type')}")
    bad = filtered_out = 0
    for p in paths:
        members = [r for r in rows if expect.get(r["source"]) == p.name]
        kept = [r for r in members if r["kept"]]
        winner = kept[0]["source"].rsplit("/", 1)[-1] if len(kept) == 1 else f"{len(kept)} kept"
        original_in = any(r["source"] in originals[p.name] for r in members)
        ok = (len(kept) == 1 and kept[0]["source"] in originals[p.name]
              and all(by_id.get(r["duplicate_of"]) is kept[0] for r in members if not r["kept"]))
        if not original_in:  # the original itself failed a filter (stage-1 reason in the ledger)
            filtered_out += 1
            verdict = "original filtered out by stage 1"
        else:
            bad += not ok
            verdict = "ok" if ok else "WRONG"
        print(f"  {p.name:<32} {len(members)} of 7 reached dedup, kept {winner:<28} fidelity "
              f"{kept[0]['fidelity'] if kept else '-'}  {verdict}")
    print(f"groups whose original passed the filters: {len(paths) - filtered_out}; represented by their original: "
          f"{len(paths) - filtered_out - bad}; originals filtered out by stage 1: {filtered_out}")
    print(f"every original that passed the filters is its group's representative: {'YES' if not bad else 'NO'}")
    return 1 if bad else 0


def _curate(site, paths, made, tmp: Path):
    import pyarrow.parquet as pq
    import ray

    expect: dict[str, str] = {}  # url -> photo name (its group)
    for p in paths:
        expect[site.photo_url(p.name)] = p.name
        expect[site.url(f"/mislabelled/text/plain/{p.name}")] = p.name  # the original's bytes as text/plain
        for kind, f in made[p.name].items():
            url = (site.url(f"/mislabelled/application/octet-stream/{f.name}") if kind == "jpeg2.jpg"
                   else site.photo_url(f.name))
            expect[url] = p.name
    listing = tmp / "urls.txt"
    listing.write_text("".join(u + "\n" for u in expect))
    cfg = config_from_dict({
        "run": {"output_root": str(tmp / "root"), "mlflow": {"enabled": False}},
        "curate": {"sources": [str(listing)], "output": str(tmp / "out"), "rows_per_shard": 16,
                   "cpus_per_block": 0.5,
                   "crawl": {"allow_hosts": ["127.0.0.1"], "per_domain_rps": 500.0, "retries": 0},
                   "filters": {"min_short_side": 128}, "balance": {"enabled": False}}})
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        t0 = time.perf_counter()
        summary = curate.run(cfg)
        took = time.perf_counter() - t0
    finally:
        ray.shutdown()
    rows = [r for f in shard_files(str(tmp / "out")) for r in pq.read_table(f).to_pylist()]
    return summary, rows, expect, took


if __name__ == "__main__":
    sys.exit(main())
