"""The `vosr` console script: every job and tool of the project, one line each.

    vosr <command> --help      a job's help lists its stages, top to bottom
    vosr curate --config configs/curate/local.yaml          (the same as python -m pipelines.curate ...)

A job command runs the job module's main() with the rest of the command line, exactly as
`python -m <module>` or `ray job submit -- python <module path>` would. The jobs are the table of jobkit/jobs.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jobkit.jobs import JOBS, chain, submitted


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
    main = importlib.import_module(JOBS[name].module).main
    prog = sys.argv[0]
    sys.argv[0] = f"vosr {name}"  # argparse's prog in the job's usage line
    try:
        return int(main(rest) or 0)
    finally:
        sys.argv[0] = prog


def chain_on_a_cluster() -> str:
    """The main chain as it runs on a cluster (README.md "On a cluster" adds the addresses and the --set lines)."""
    lines = ["the main chain on a cluster, in order (`vosr demo` runs it on this machine with configs/demo/):"]
    for job in chain():
        if job in submitted():
            run = f"ray job submit --working-dir . -- python {job.script} --config {job.cluster_config}"
        else:  # the endpoint: a Ray Serve application (the app object of its module)
            run = f"VOSR_CONFIG={job.cluster_config} serve run --working-dir . {job.module}:app"
        lines.append(f"  {job.name:<11} {run}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vosr", description=__doc__, epilog=chain_on_a_cluster(),
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
    for job in JOBS.values():
        sub.add_parser(job.name, help=f"{job.purpose} ({job.module})", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in JOBS:
        return run_job(argv[0], argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
