"""Shared command-line front of every job: `--config FILE` plus repeated `--set section.key=value`; the job's
module docstring (its stages, top to bottom) is its --help text."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from jobkit.config import ConfigError, load_config

if TYPE_CHECKING:
    from jobkit.config import Config

# Ray's job supervisor sets this in the environment of every `ray job submit` entrypoint (the job's runtime_env
# and metadata as JSON; ray/_private/runtime_env/constants.py, Ray 2.60). Nothing else sets it.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=False, default=None, help="YAML config file (see `vosr config --explain`)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key; repeatable")
    p.add_argument("--debug", action="store_true", help="on a failure, show the traceback")
    return p


def parse_job_args(description: str, argv: list[str] | None = None,
                   parser: argparse.ArgumentParser | None = None,
                   writes: Sequence[str] = ()) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config, exiting with status 2 and a clear message on a bad config.
    `writes`: the keys of the folders this job writes (see check_submitted_paths)."""
    p = parser or job_parser(description)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        check_submitted_paths(cfg, writes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return cfg, args


def job_main(description: str, argv: list[str] | None, run: Callable[[Config, argparse.Namespace], dict],
             writes: Sequence[str] = (), parser: argparse.ArgumentParser | None = None,
             usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Every job's main: parse -> run -> print the summary JSON. The exit-code convention of all jobs:
    0 done; 2 a usage error (bad config or arguments, or one of `usage_errors`), one `error:` line; 1 a runtime
    failure, one `error:` line naming its cause (the traceback only with --debug); 130 interrupted."""
    from vosr.config import redact

    cfg, args = parse_job_args(description, argv, parser, writes)
    try:
        summary = run(cfg, args)
    except usage_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(redact(summary), indent=2, default=str))
    return 0


def submitted_working_dir() -> str | None:
    """None when this process is not a `ray job submit` entrypoint; else the job's runtime_env working_dir
    (a gcs:// package URI, "" when the job was submitted without one)."""
    raw = os.environ.get(SUBMITTED_JOB_ENV)
    if raw is None:
        return None
    try:
        env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        env = {}
    return str(env.get("working_dir") or "")


def _get(cfg: Config, key: str) -> str:
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return str(value)


def _is_relative_local(path: str) -> bool:
    return bool(path) and "://" not in path and not os.path.isabs(os.path.expanduser(path))


def check_submitted_paths(cfg: Config, writes: Sequence[str]) -> None:
    """Under `ray job submit` a job runs in a working directory of Ray's (with `--working-dir`, a temporary copy of
    the submitted checkout under the Ray session folder, one per node), so a relative path to write to would land
    there and vanish with it, and differ between nodes. Refuse such paths up front, naming the key. Relative
    paths the job only reads keep meaning "in the submitted checkout". Run directly, nothing changes."""
    if submitted_working_dir() is None:
        return
    keys = list(writes)
    m = cfg.run.mlflow
    # MLflow writes under run.output_root unless a tracking server and an artifact location are both given
    if m.enabled and (not m.tracking_uri or not m.artifact_location):
        keys.append("run.output_root")
    if m.enabled:
        keys.append("run.mlflow.artifact_location")
    bad = [(k, _get(cfg, k)) for k in keys if _is_relative_local(_get(cfg, k))]
    if not bad:
        return
    where = os.getcwd()
    lines = [f"{k}={v!r} is a relative path" for k, v in bad]
    raise ConfigError(
        "; ".join(lines) + f". This job was started by `ray job submit`, so it would be resolved against the job's "
        f"working directory on the cluster ({where}), a temporary copy of the submitted checkout, not the folder "
        "you submitted from: what the job writes there is lost with it. Give an absolute path that every node "
        "can reach, or an s3:// URI, e.g. " + " ".join(f"--set {k}=/shared/vosr/{v}" for k, v in bad)
        + (" (run.output_root holds the MLflow store and artifacts unless run.mlflow.tracking_uri and "
           "run.mlflow.artifact_location are set)" if any(k == "run.output_root" for k, _ in bad) else ""))
