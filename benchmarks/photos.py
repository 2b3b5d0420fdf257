"""Real photos for benchmarks: ../shared/data/dev when present, else the photos the project ships."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def photo_paths() -> list[Path]:
    dev = ROOT.parent / "shared" / "data" / "dev"
    root = dev if dev.is_dir() else ROOT / "assets" / "photos"
    return sorted(p for p in root.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
