"""The `vosr` console script: configuration help, parameter counts and upscaling."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from vosr.config import ConfigError, explain_config, load_config

    try:
        if args.explain is not None:
            print(explain_config(args.explain or None))
            return 0
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import yaml

    from vosr.config import redact

    print(yaml.safe_dump(redact(cfg), sort_keys=False), end="")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from vosr.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [f"preset={args.preset}", *args.set] if args.preset else args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from vosr.model import count_parameters

    print(json.dumps(count_parameters(cfg), indent=2))
    return 0


def _cmd_upscale(rest: list[str]) -> int:
    from inference.upscale import main as upscale_main

    return upscale_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "upscale":
        return _cmd_upscale(argv[1:])
    p = argparse.ArgumentParser(prog="vosr", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="print the resolved config, or --explain the keys")
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
    sub.add_parser("upscale", help="upscale images (see `vosr upscale --help`)")
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
