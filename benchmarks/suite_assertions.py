"""Assertions in a checkout's test suite, counted from the source: `assert` statements and `pytest.raises` /
`pytest.warns` blocks, per test file and per tier (tests/conftest.py names the tiers; a checkout whose tests sit
directly in tests/ is counted under the tier each file has in THIS checkout, or --moved NAME=TIER).

    .venv/bin/python benchmarks/suite_assertions.py [--root /path/to/checkout] [--compare /path/to/other] [--files]

With --compare, prints both checkouts side by side and the files whose counts differ. Static counts: an assertion
in a loop or a helper counts once; helpers under tests/helpers are counted as their own row.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.suite_tiers import TIERS, tier_map  # noqa: E402 - the tiers and file -> tier map suite_tiers uses


def count_file(path: Path) -> int:
    n = 0
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Assert):
            n += 1
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("raises", "warns") and getattr(node.func.value, "id", "") == "pytest":
            n += 1
    return n


def count(root: Path, tiers: dict[str, str]) -> dict[str, tuple[str, int]]:
    """test file name -> (tier, assertions)."""
    out = {}
    for p in sorted((root / "tests").rglob("*.py")):
        rel = p.relative_to(root / "tests")
        if rel.parts[0] == "helpers":
            out[f"helpers/{rel.name}"] = ("helpers", count_file(p))
        elif p.name.startswith("test_"):
            tier = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in TIERS else tiers.get(p.name, "?")
            out[p.name] = (tier, count_file(p))
    return out


def by_tier(files: dict[str, tuple[str, int]]) -> Counter:
    c = Counter()
    for tier, n in files.values():
        c[tier] += n
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--compare", default="", help="a second checkout (e.g. before the tiers)")
    ap.add_argument("--moved", nargs="*", default=["test_demo_s3.py=e2e"], metavar="FILE=TIER")
    ap.add_argument("--files", action="store_true", help="print every file's count")
    args = ap.parse_args()
    tiers = tier_map(dict(m.split("=", 1) for m in args.moved))
    roots = [Path(args.root).resolve()] + ([Path(args.compare).resolve()] if args.compare else [])
    counts = [count(r, tiers) for r in roots]
    order = [*TIERS, "helpers", "?"]
    print(f"{'tier':<12}" + "".join(f"{str(r)[-28:]:>30}" for r in roots))
    for tier in order:
        vals = [by_tier(c).get(tier, 0) for c in counts]
        if any(vals):
            print(f"{tier:<12}" + "".join(f"{v:>30}" for v in vals))
    print(f"{'total':<12}" + "".join(f"{sum(by_tier(c).values()):>30}" for c in counts))
    if args.files or len(counts) == 2:
        names = sorted(set().union(*counts))
        for name in names:
            vals = [c.get(name, ("", 0))[1] for c in counts]
            if args.files or len(set(vals)) > 1:
                print(f"  {name:<48}" + "".join(f"{v:>8}" for v in vals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
