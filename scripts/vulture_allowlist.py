"""Names the dead-code check of `make lint` (vulture; settings in pyproject.toml [tool.vulture]) cannot see being
used, each with who uses it. Never imported: vulture reads this file as source, where a name or `_.attribute`
counts as a use. Anything else vulture reports is dead: delete it (or, if only a test uses it, move it to the test).
Decorator-registered functions and classes (FastAPI routes, @config_section) are exempt in pyproject.toml."""

# PyTorch calls nn.Module.forward through __call__.
_.forward

# Module __getattr__ (PEP 562): vosr.Upscaler, jobkit.config.Config and inference.serve's app, built on first use.
__getattr__

# Ray: the worker set-up hook is named by a string (jobkit/ray_env.QUIET_HOOK); DataContext switches are assigned.
quiet_dashboardless_warnings
_.enable_progress_bars
_.shuffle_strategy
# Ray Data's Datasource interface (training/data.py MixedShards), called by Ray with these arguments.
_.get_name
_.estimate_inmemory_data_size
_.get_read_tasks
parallelism
per_task_row_limit

# torch.backends switches, assigned.
_.allow_tf32

# MLflow's pyfunc interface (inference/pyfunc_model.py).
_.load_context
_.predict

# http.server's handler hooks and class settings (demo/photo_server.py).
_.server_version
_.log_message
fmt
_.do_GET
_.do_HEAD
_.daemon_threads

# The file-like protocol pyarrow's ParquetWriter writes through (pipelines/features/writer._Sink).
_.closed
_.tell

# Held only to keep objects alive for a step's lifetime (training/memory_plan.WorkerState: the full EMA under FSDP).
_.extras

# The options the last batch ran with (tiles fitted to the memory budget), for a caller to inspect
# (vosr/upscaler.Upscaler.last_options; tests/unit/test_vae_tiling.py checks upscale() applies the fitted tiles).
_.last_options
