"""Which checkpoint a (re)started run continues from: the latest COMPLETE one in the run's storage folder.

Why not only `ray.train.get_checkpoint()`: Ray Train V2 registers a checkpoint only when its controller has
collected that round's report from every rank, and it collects reports at its health-check poll
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default; each worker's result queue holds one report). A checkpoint
that rank 0 had already uploaded but the controller had not yet collected is forgotten when its workers die
(a lost node, a killed process): the restarted workers get the previous registered checkpoint, or None, and
redo finished steps. The worker loop therefore waits, after each checkpoint report, until the controller has
registered it (ray.train.get_all_reported_checkpoints, COMMITTED); what can still be lost is a checkpoint whose
workers die during that wait. So, in addition, every checkpoint folder carries a manifest (`_vosr_files.json`:
every file and its size, written before the upload); a folder whose files all match it is complete whichever
order the upload wrote them in, and the newest complete folder wins over an older registered one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vosr import storage

MANIFEST = "_vosr_files.json"
PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint_<step>` folder name (a path or URI is fine), None for other names."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not base.startswith(PREFIX):
        return None
    digits = base[len(PREFIX):]
    return int(digits) if digits.isdigit() else None


def local_files(folder: Path) -> dict[str, int]:
    """{relative path: size} of the files under a local checkpoint folder (the manifest itself excluded)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, other_ranks: dict[str, int] | None = None) -> None:
    """Record every file of a finished local checkpoint folder with its size (call after writing, before upload).
    `other_ranks`: the files other ranks upload into the same checkpoint (a sharded FSDP checkpoint), which the
    folder is only complete with."""
    files = {**(other_ranks or {}), **local_files(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def complete_checkpoints(run_uri: str, endpoint: str = "") -> list[tuple[int, str]]:
    """[(step, folder URI)] of the complete checkpoint folders directly under `run_uri`, by step."""
    import pyarrow.fs as pafs

    fs, root = storage.open_fs(run_uri, endpoint)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    sizes: dict[str, dict[str, int]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root.rstrip("/")) + 1:]
        folder, _, name = rel.partition("/")
        if name and checkpoint_step(folder) is not None:
            sizes.setdefault(folder, {})[name] = info.size
    out = []
    for folder, have in sizes.items():
        if MANIFEST not in have:
            continue
        with fs.open_input_stream(f"{root.rstrip('/')}/{folder}/{MANIFEST}") as f:
            text = f.read().decode(errors="replace")
        try:
            want = json.loads(text)["files"]
        except (ValueError, KeyError, TypeError):  # the manifest itself is still being copied: not complete yet
            continue
        if want and all(have.get(name) == size for name, size in want.items()):
            out.append((checkpoint_step(folder), storage.join(run_uri, folder)))
    return sorted(out)


def latest_complete(run_uri: str, endpoint: str = "") -> tuple[int, str] | None:
    found = complete_checkpoints(run_uri, endpoint)
    return found[-1] if found else None


def choose(run_uri: str, endpoint: str, registered: Any) -> tuple[int, str, str] | None:
    """(step, folder URI, source) to resume from: Ray's registered checkpoint ("ray") unless a newer complete
    one exists in storage ("storage"); None for a fresh start. `registered`: ray.train.get_checkpoint()."""
    best = latest_complete(run_uri, endpoint)
    if registered is not None:
        step = checkpoint_step(registered.path)
        if step is not None and (best is None or step >= best[0]):
            return step, storage.join(run_uri, checkpoint_name(step)), "ray"
    if best is None:
        return None
    return best[0], best[1], "storage"


def open_checkpoint(uri: str, endpoint: str = ""):
    """A ray.train.Checkpoint for a folder URI (local or s3://), for `as_directory()`."""
    import ray.train

    fs, path = storage.open_fs(uri, endpoint)
    return ray.train.Checkpoint(path, filesystem=fs)


def prune_untracked(run_uri: str, endpoint: str, tracked: set[str], keep: int, final_step: int) -> list[str]:
    """After a run finished: delete checkpoint folders Ray Train does not track (`tracked`: the folder names it
    retains) -- uploads it never registered because their workers died first -- unless they are among the
    `keep` newest complete checkpoints or not older than the final one. Returns the deleted folder names."""
    import pyarrow.fs as pafs

    newest = {checkpoint_name(step) for step, _ in complete_checkpoints(run_uri, endpoint)[-keep:]}
    fs, root = storage.open_fs(run_uri, endpoint)
    deleted = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        step = checkpoint_step(name)
        if (info.type == pafs.FileType.Directory and step is not None and step < final_step
                and name not in tracked and name not in newest):
            fs.delete_dir(info.path)
            deleted.append(name)
    return sorted(deleted)
