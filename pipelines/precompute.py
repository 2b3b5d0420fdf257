"""Feature precompute job: curated shards in, feature shards out, each under its explicit pyarrow schema
(curate_schema.CURATED_SCHEMA in; features/schema.feature_schema, sized by the preset, out).

    python pipelines/precompute.py --config configs/precompute/tiny.yaml [--set precompute.variants=4]

Stages, top to bottom:
    plan            one listing of the curated and of the feature shards; skip finished shards (resume); count
                    the kept rows of the pending ones (Ray tasks of 64 shards when there are more)
    metadata        build the encoders' identities; write or check `_vosr_features.json`
    read_curated    kept rows (id, image bytes) of the pending shards                    (Ray Data read)
    make_pairs      decode -> per variant seeded crop + Real-ESRGAN degradation           (CPU tasks)
    Encoder         HR latent, LR latent, semantic tokens                                 (actor pool, GPU if any)
    write_parts     each encoded batch split by source shard, written as part files       (CPU tasks)
    write_shards    driver: reads the parts' small summaries; when a shard's rows are all in parts, launches a
                    task that merges them into the shard, written atomically (pipelines/features/writer.py)
    summary         throughput, bytes per sample per column, counts -> summary.json, stdout, MLflow

Sharding is deterministic: curated `shards/part-<key>.parquet` becomes feature `shards/part-<key>.parquet`, rows
sorted by (id, variant). A killed run leaves only complete shards (and transient `_parts/`); a re-run skips them
and produces the rest. No row byte reaches the driver and no global order is kept: shards finish in any order.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_main
    from pipelines.features.job import run

    return job_main(__doc__, argv, lambda cfg, _: run(cfg), writes=["precompute.output"])


if __name__ == "__main__":
    raise SystemExit(main())
