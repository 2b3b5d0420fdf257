"""Resolve where a model lives to a local checkpoint folder (config.json + model.safetensors, or a model folder
released by the VOSR authors: args.json + their weights, vosr/released.py).

Accepted, by scheme (SCHEMES): a local folder (the checkpoint itself, or any folder with exactly one checkpoint
somewhere inside, as an MLflow model's artifacts are), an s3:// checkpoint folder (config.json + *.safetensors
fetched into a local cache keyed by URI, sizes and etags), an MLflow URI (`models:/name/version`,
`models:/name@alias`, `runs:/run_id/path`), downloaded with mlflow.artifacts.download_artifacts from the configured
tracking server, or a Hugging Face URI (`hf://CSWRY/VOSR/VOSR_0.5B_os[@revision]`, vosr/hub.py: only the named
folder, into the Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only). MLflow stays out of vosr/: this is
the only place that imports it for inference.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CHECKPOINT_FILES = ("config.json", "model.safetensors")
_SHARDED_HINT = ("; this is a sharded (FSDP) training checkpoint: use the run's export (summary.json export_uri) "
                 "or export it with `python -m training.export <checkpoint> <output folder>`")


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint folder could be found where the model URI points."""


def is_checkpoint(folder: Path) -> bool:
    """This project's checkpoint folder, or a released VOSR model folder (vosr/released.py)."""
    from vosr.released import is_released_folder

    return all((folder / name).is_file() for name in CHECKPOINT_FILES) or is_released_folder(folder)


def find_checkpoint(root: str | Path) -> Path:
    """The folder under `root` (or `root` itself) holding config.json + model.safetensors; exactly one."""
    root = Path(root)
    if not root.exists():
        raise ModelNotFoundError(f"model path {root} does not exist")
    if is_checkpoint(root):
        return root
    found = sorted({p.parent for p in root.rglob("model.safetensors") if is_checkpoint(p.parent)}
                   | {p.parent for p in root.rglob("args.json") if is_checkpoint(p.parent)})
    if not found:
        raise ModelNotFoundError(f"no checkpoint folder (config.json + model.safetensors, or a released VOSR "
                                 f"folder: args.json + weights) under {root}"
                                 f"{_SHARDED_HINT if any(root.rglob('dcp/.metadata')) else ''}")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise ModelNotFoundError(f"{len(found)} checkpoint folders under {root} ({names}); point at one of them")
    return found[0]


def tracking_uri_for(cfg) -> str:
    """The configured MLflow tracking URI, resolved like every job does (jobkit.tracking: run.mlflow.tracking_uri,
    else sqlite under run.output_root); without a config, MLFLOW_TRACKING_URI or MLflow's default."""
    if cfg is None:
        return os.environ.get("MLFLOW_TRACKING_URI", "")
    from jobkit.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg)


def resolve_model(uri: str, cfg=None, download_root: str | Path | None = None) -> Path:
    """A local checkpoint folder for `uri` (a path, an s3:// folder, an MLflow URI or an hf:// URI).
    `download_root`: where MLflow downloads go, and the cache root for s3:// checkpoints (default:
    default_cache_root()); hf:// URIs use the Hugging Face cache."""
    if not uri:
        raise ModelNotFoundError("no model given: set inference.checkpoint to a checkpoint folder, models:/name/"
                                 "version or hf://owner/repo/folder")
    for prefix, resolver in SCHEMES:
        if uri.startswith(prefix):
            return resolver(uri, cfg, download_root)
    if "://" in uri:
        return find_checkpoint(fetch_remote_checkpoint(uri, endpoint_url_for(cfg), download_root))
    return find_checkpoint(Path(uri).expanduser())


def _resolve_file(uri: str, cfg, download_root) -> Path:
    return find_checkpoint(Path(uri[len("file://"):]).expanduser())


def _resolve_hub(uri: str, cfg, download_root) -> Path:
    """hf://owner/repo/path[@revision] through the Hugging Face cache (vosr/hub.py)."""
    from vosr.hub import HubError, resolve

    try:
        return find_checkpoint(resolve(uri))
    except HubError as exc:
        raise ModelNotFoundError(str(exc)) from exc


def _resolve_mlflow(uri: str, cfg, download_root) -> Path:
    """models:/, runs:/ and mlflow-artifacts:/ URIs from the configured tracking server."""
    import mlflow

    tracking = tracking_uri_for(cfg)
    if tracking:
        mlflow.set_tracking_uri(tracking)
    dst = Path(download_root) if download_root else Path(tempfile.mkdtemp(prefix="vosr-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types; say which model failed
        raise ModelNotFoundError(f"could not download {uri} from {tracking or 'the default tracking URI'}: "
                                 f"{exc}") from exc
    return find_checkpoint(local)


# scheme prefix -> resolver(uri, cfg, download_root); other "://" URIs are remote storage (s3://), the rest paths
SCHEMES = tuple((p, _resolve_mlflow) for p in MLFLOW_SCHEMES) + (("hf://", _resolve_hub), ("file://", _resolve_file))


def endpoint_url_for(cfg) -> str:
    """The S3 endpoint override of the config (the first non-empty `*.s3_endpoint_url`); empty = vosr.storage's
    AWS_ENDPOINT_URL / AWS default."""
    for section in ("inference", "eval", "train", "precompute", "curate"):
        value = getattr(getattr(cfg, section, None), "s3_endpoint_url", "") if cfg is not None else ""
        if value:
            return value
    return ""


def default_cache_root() -> Path:
    """Where remote checkpoints are cached: $VOSR_MODEL_CACHE, else ~/.cache/vosr/models."""
    env = os.environ.get("VOSR_MODEL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vosr" / "models"


def _remote_checkpoint_files(uri: str, endpoint_url: str) -> list[tuple[str, str, int, str]]:
    """(remote path, path relative to `uri`, size, etag) of the checkpoint files (config.json, *.safetensors) of
    the one checkpoint folder at or under `uri`."""
    from vosr.storage import fsspec_fs

    if not uri.startswith("s3://"):
        raise ModelNotFoundError(f"cannot read the model at {uri}: remote checkpoints must be on s3:// "
                                 "(or give a local folder or an MLflow models:/ or runs:/ URI)")
    fs = fsspec_fs(uri, endpoint_url)
    root = uri[len("s3://"):].rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except Exception as exc:  # noqa: BLE001 - s3fs raises several types (permissions, endpoint down)
        raise ModelNotFoundError(f"could not list the checkpoint folder {uri}: {exc}") from exc
    by_dir: dict[str, dict[str, dict]] = {}
    for path, info in listing.items():
        if info.get("type", "file") != "file" or ".tmp-" in path:
            continue
        folder, name = posixpath.split(path)
        by_dir.setdefault(folder, {})[name] = info
    found = sorted(d for d, files in by_dir.items() if all(n in files for n in CHECKPOINT_FILES))
    if not found:
        sharded = any(p.endswith("/dcp/.metadata") for p in listing)
        raise ModelNotFoundError(f"no checkpoint at {uri}: expected a folder holding "
                                 f"{' + '.join(CHECKPOINT_FILES)} (found {len(listing)} objects)"
                                 f"{_SHARDED_HINT if sharded else ''}")
    if len(found) > 1:
        names = ", ".join(posixpath.relpath(d, root) for d in found[:5])
        raise ModelNotFoundError(f"{len(found)} checkpoint folders under {uri} ({names}); point at one of them")
    folder = found[0]
    out = []
    for name, info in sorted(by_dir[folder].items()):
        if name == "config.json" or name.endswith(".safetensors"):
            etag = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "").strip('"')
            out.append((f"{folder}/{name}", posixpath.relpath(f"{folder}/{name}", root), int(info.get("size", 0)),
                        etag))
    return out


def fetch_remote_checkpoint(uri: str, endpoint_url: str = "", cache_root: str | Path | None = None) -> Path:
    """Download the checkpoint files (config.json + *.safetensors) of a remote checkpoint folder into a local
    cache folder keyed by the URI and each file's size and etag, so a changed checkpoint is fetched again and an
    unchanged one is not. The folder appears complete or not at all (downloaded aside, then renamed)."""
    import hashlib
    import shutil

    from vosr.storage import fsspec_fs

    files = _remote_checkpoint_files(uri, endpoint_url)
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), [f[1:] for f in files]]).encode()).hexdigest()[:24]
    root = Path(cache_root) if cache_root else default_cache_root()
    dst = root / key
    if dst.is_dir() and all((dst / rel).is_file() and (dst / rel).stat().st_size == size
                            for _, rel, size, _ in files):
        return dst
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        fs = fsspec_fs(uri, endpoint_url)
        for remote, rel, size, _ in files:
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(local))
            if local.stat().st_size != size:
                raise ModelNotFoundError(f"{uri}: {rel} changed while it was downloaded ({local.stat().st_size} of "
                                         f"{size} bytes); try again")
        (tmp / "SOURCE.json").write_text(json.dumps({"uri": uri, "files": [list(f[1:]) for f in files]}, indent=2))
        shutil.rmtree(dst, ignore_errors=True)
        try:
            tmp.rename(dst)
        except OSError:            # another process finished the same download first
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
