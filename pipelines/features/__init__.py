"""Stages of the feature precompute job (pipelines/precompute.py) and of training's online mode: the feature
shards' schema and metadata (schema.py), the shared read -> degrade -> encode stages (stages.py), the part and
shard writers that run in Ray tasks (writer.py), the online dataset (online.py) and the job's driver (job.py)."""
