"""Stages of the curation job (pipelines/curate.py): sources, crawl, per-image analysis, LSH dedup, connected
components, balancing, shard writing and stats. Ray-free helpers except where a module says otherwise."""
