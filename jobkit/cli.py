"""The `vosr` console script: every job and tool of the project, one line each.

    vosr <command> --help      a job's help lists its stages, top to bottom
    vosr curate --config configs/curate/local.yaml          (the same as python -m pipelines.curate ...)

A job command runs the job module's main() with the rest of the command line, exactly as
`python -m <module>` or `ray job submit -- python <module path>` would.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> (module whose main(argv) runs it, one-line purpose)
JOBS: dict[str, tuple[str, str]] = {
    "curate": ("pipelines.curate", "crawl or ingest images, filter, dedupe and balance them into curated Parquet shards"),
    "precompute": ("pipelines.precompute", "degrade and encode curated shards into feature shards (latents + semantic tokens)"),
    "pretrain": ("training.pretrain", "train the multi-step teacher on Ray Train"),
    "distill": ("training.distill", "distil the teacher into the one-step student and register it in MLflow"),
    "evaluate": ("inference.evaluate", "score bicubic, peers, the student and the teacher on a paired benchmark"),
    "serve": ("inference.serve", "serve the upscaler over HTTP with Ray Serve"),
    "upscale": ("inference.upscale", "upscale image files or folders on this machine"),
    "export": ("training.export", "export a sharded (FSDP) checkpoint to the folder serving and the registry read"),
    "import": ("inference.import_released", "import a model released by the VOSR authors (folder or hf:// URI) as a checkpoint folder"),
    "demo": ("demo.chain", "run the whole chain on the embedded tiny preset on this machine (make demo)"),
    "plan": ("jobkit.plan", "a job's cost at a corpus size: peak memory per process, storage, CPU/GPU-hours; "
                            "fails when a bound exceeds the nodes"),
}


def _cmd_config(args: argparse.Namespace) -> int:
    from jobkit.config import ConfigError, explain_config, load_config

    try:
        if args.explain is not None:
            print(explain_config(args.explain or None))
            return 0
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import yaml

    from vosr.config import redact

    print(yaml.safe_dump(redact(cfg), sort_keys=False), end="")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from jobkit.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [f"preset={args.preset}", *args.set] if args.preset else args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from vosr.model import count_parameters

    print(json.dumps(count_parameters(cfg), indent=2))
    return 0


def run_job(name: str, rest: list[str]) -> int:
    """Run job `name` with its own command line `rest` (its --help, its exit code)."""
    module, _ = JOBS[name]
    main = importlib.import_module(module).main
    prog = sys.argv[0]
    sys.argv[0] = f"vosr {name}"  # argparse's prog in the job's usage line
    try:
        return int(main(rest) or 0)
    finally:
        sys.argv[0] = prog


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vosr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="<command>")
    c = sub.add_parser("config", help="print the resolved config, or --explain every key")
    c.add_argument("--config", default=None, help="YAML config file")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    c.add_argument("--explain", nargs="?", const="", default=None, metavar="SECTION",
                   help="document every key (or one section) with its default")
    c.set_defaults(func=_cmd_config)
    q = sub.add_parser("params", help="DiT parameter counts of a preset as JSON")
    q.add_argument("--preset", default=None)
    q.add_argument("--config", default=None)
    q.add_argument("--set", action="append", default=[])
    q.set_defaults(func=_cmd_params)
    for name, (module, purpose) in JOBS.items():
        sub.add_parser(name, help=f"{purpose} ({module})", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in JOBS:
        return run_job(argv[0], argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
