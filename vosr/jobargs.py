"""Shared command-line front of every job: `--config FILE` plus repeated `--set section.key=value`."""

from __future__ import annotations

import argparse
import sys

from vosr.config import Config, ConfigError, load_config


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=False, default=None, help="YAML config file (see `vosr config --explain`)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key; repeatable")
    return p


def parse_job_args(description: str, argv: list[str] | None = None,
                   parser: argparse.ArgumentParser | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config, exiting with status 2 and a clear message on a bad config."""
    p = parser or job_parser(description)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return cfg, args
