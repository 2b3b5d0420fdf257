"""Where a model lives -> a local checkpoint folder (config.json + model.safetensors, or a model folder released
by the VOSR authors: args.json + their weights, vosr/released.py), one resolver per URI scheme.

    resolve("path/to/checkpoint")                  a local folder (or file://), or any folder with exactly one
                                                   checkpoint inside it (an MLflow model's artifacts are such)
    resolve("hf://CSWRY/VOSR/VOSR_0.5B_os")        Hugging Face: only the named folder, into the Hugging Face
                                                   cache (vosr/hub.py; HF_HUB_OFFLINE=1 reads the cache only)
    resolve("s3://bucket/runs/x/checkpoint_0400")  fetched into the cache, keyed by the URI and each file's size
                                                   and ETag: a changed checkpoint is fetched again, an unchanged
                                                   one never
    resolve("models:/vosr-student@champion")       MLflow registry: the alias (or /latest, /Production) is turned
    resolve("models:/vosr-student/3")              into a version first, then each (registry, name, version) is
                                                   downloaded once into the cache (a version never changes)
    resolve("runs:/<run id>/checkpoint")           MLflow run artifacts, cached per (tracking server, run, path)

Schemes are dispatched through RESOLVERS (`register_scheme` adds one); an unknown scheme is refused with the list
of known ones. MLflow, s3fs and huggingface_hub are imported inside their resolver only, so `import vosr` stays
free of them (the method library never imports Ray or MLflow at import time). inference/model_uri.py is the jobs'
front: it takes the S3 endpoint and the MLflow URIs from a config.

MLflow settings: the tracking/registry URIs given by the caller win; otherwise MLflow's own environment variables
(MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI) and defaults apply. Nothing here changes MLflow's process-wide
settings. Downloads land in a hidden temporary folder inside the cache root and are renamed into place when
complete; the temporary folder is removed whatever happens, so a failed download leaves nothing behind.

The cache root is `cache_root` when given, else $VOSR_MODEL_CACHE, else ~/.cache/vosr/models.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_FILES = ("config.json", "model.safetensors")
MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")
SOURCE_FILE = "SOURCE.json"   # written last into every cache folder: what it was fetched from
_SHARDED_HINT = ("; this is a sharded (FSDP) training checkpoint: use the run's export (summary.json export_uri) "
                 "or export it with `python -m training.export <checkpoint> <output folder>`")


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint folder could be found where the model URI points."""


@dataclass(frozen=True)
class ResolveContext:
    """What a resolver may need besides the URI. Empty strings mean "the tool's own default / environment"."""

    endpoint_url: str = ""        # S3 endpoint override (MinIO, moto); empty = vosr.storage's AWS_ENDPOINT_URL
    tracking_uri: str = ""        # MLflow tracking URI; empty = MLFLOW_TRACKING_URI or MLflow's default
    registry_uri: str = ""        # MLflow registry URI; empty = MLFLOW_REGISTRY_URI or the tracking URI
    cache_root: Path | None = None

    @property
    def cache(self) -> Path:
        return Path(self.cache_root) if self.cache_root else default_cache_root()


Resolver = Callable[[str, ResolveContext], Path]
RESOLVERS: dict[str, Resolver] = {}


def register_scheme(scheme: str, resolver: Resolver) -> None:
    """Make `scheme://...` (or `scheme:/...`) URIs resolvable by `resolver(uri, ctx) -> local checkpoint folder`."""
    RESOLVERS[scheme] = resolver


def scheme_of(uri: str) -> str:
    """"models" for models:/x/1, "s3" for s3://b/k, "file" for a local path or file://."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/", uri)
    if not m or len(m.group(1)) == 1:       # C:/ is a Windows drive, not a scheme
        return "file"
    return m.group(1).lower()


def default_cache_root() -> Path:
    """Where remote checkpoints are cached: $VOSR_MODEL_CACHE, else ~/.cache/vosr/models."""
    env = os.environ.get("VOSR_MODEL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vosr" / "models"


def resolve(uri: str, *, endpoint_url: str = "", tracking_uri: str = "", registry_uri: str = "",
            cache_root: str | Path | None = None) -> Path:
    """A local checkpoint folder for `uri` (see the module docstring for the schemes)."""
    if not uri:
        raise ModelNotFoundError("no model given: pass a checkpoint folder, an s3:// folder, an MLflow "
                                 "models:/name@alias (or models:/name/version) URI or hf://owner/repo/folder")
    ctx = ResolveContext(endpoint_url, tracking_uri, registry_uri, Path(cache_root) if cache_root else None)
    scheme = scheme_of(str(uri))
    if scheme not in RESOLVERS:
        raise ModelNotFoundError(f"cannot resolve {uri}: unknown scheme {scheme!r}; known: "
                                 f"{', '.join(sorted(RESOLVERS))} (or a local folder)")
    return RESOLVERS[scheme](str(uri), ctx)


# --- local folders -----------------------------------------------------------------------------------------------

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


def _resolve_local(uri: str, ctx: ResolveContext) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return find_checkpoint(Path(uri).expanduser())


# --- the cache ---------------------------------------------------------------------------------------------------

def _cached(dst: Path) -> Path | None:
    """The checkpoint of a complete cache folder (its SOURCE.json is written last), else None."""
    if (dst / SOURCE_FILE).is_file():
        try:
            return find_checkpoint(dst)
        except ModelNotFoundError:
            return None
    return None


def _fill_cache(dst: Path, source: dict, download: Callable[[Path], None]) -> Path:
    """Run `download(tmp)` into a hidden folder beside `dst`, record `source`, then rename it to `dst`. The hidden
    folder is removed whatever happens; a concurrent process that finished first wins."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        download(tmp)
        find_checkpoint(tmp)       # refuse to cache something that is not a checkpoint
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        shutil.rmtree(dst, ignore_errors=True)
        try:
            tmp.rename(dst)
        except OSError:            # another process finished the same download first
            if _cached(dst) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return find_checkpoint(dst)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


# --- s3:// ---------------------------------------------------------------------------------------------------------

def _remote_checkpoint_files(uri: str, endpoint_url: str) -> list[tuple[str, str, int, str]]:
    """(remote path, path relative to `uri`, size, etag) of the checkpoint files (config.json, *.safetensors) of
    the one checkpoint folder at or under `uri`."""
    from vosr.storage import fsspec_fs

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
    """Download the checkpoint files (config.json + *.safetensors) of an s3:// checkpoint folder into a cache
    folder keyed by the URI and each file's size and etag, so a changed checkpoint is fetched again and an
    unchanged one is not. The folder appears complete or not at all."""
    from vosr.storage import fsspec_fs

    files = _remote_checkpoint_files(uri, endpoint_url)
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), [f[1:] for f in files]]).encode()).hexdigest()[:24]
    dst = (Path(cache_root) if cache_root else default_cache_root()) / key
    if dst.is_dir() and all((dst / rel).is_file() and (dst / rel).stat().st_size == size
                            for _, rel, size, _ in files):
        return find_checkpoint(dst)

    def download(tmp: Path) -> None:
        fs = fsspec_fs(uri, endpoint_url)
        for remote, rel, size, _ in files:
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(local))
            if local.stat().st_size != size:
                raise ModelNotFoundError(f"{uri}: {rel} changed while it was downloaded ({local.stat().st_size} of "
                                         f"{size} bytes); try again")

    _fill_cache(dst, {"uri": uri, "files": [list(f[1:]) for f in files]}, download)
    return dst


def _resolve_s3(uri: str, ctx: ResolveContext) -> Path:
    return find_checkpoint(fetch_remote_checkpoint(uri, ctx.endpoint_url, ctx.cache))


# --- MLflow (models:/, runs:/, mlflow-artifacts:/) -----------------------------------------------------------------

def mlflow_uris(ctx: ResolveContext) -> tuple[str, str]:
    """(tracking URI, registry URI) as MLflow would use them: the given ones, else MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI, else MLflow's defaults (the registry follows the tracking URI)."""
    import mlflow

    tracking = ctx.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or mlflow.get_tracking_uri()
    registry = ctx.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI", "") or tracking
    return tracking, registry


def parse_models_uri(uri: str) -> tuple[str, str, str]:
    """models:/name/version | models:/name/stage | models:/name@alias [/sub/path] -> (name, version-or-stage
    or "@alias", sub path)."""
    rest = uri[len("models:/"):].strip("/")
    if not rest:
        raise ModelNotFoundError(f"{uri}: expected models:/<name>/<version>, models:/<name>@<alias> or "
                                 "models:/<name>/latest")
    head, _, sub = rest.partition("/")
    if "@" in head:
        name, alias = head.split("@", 1)
        return name, "@" + alias, sub
    ref, _, sub = sub.partition("/")
    if not ref:
        raise ModelNotFoundError(f"{uri}: no version, stage or alias; use models:/{head}/<version>, "
                                 f"models:/{head}@<alias> or models:/{head}/latest")
    return head, ref, sub


def _model_version(client, name: str, ref: str) -> str:
    """The version number behind a version, alias, 'latest' or stage."""
    if ref.startswith("@"):
        return str(client.get_model_version_by_alias(name, ref[1:]).version)
    if ref.isdigit():
        return str(client.get_model_version(name, ref).version)
    versions = client.search_model_versions(f"name = '{name}'")
    if ref.lower() != "latest":
        versions = [v for v in versions if (v.current_stage or "").lower() == ref.lower()]
    if not versions:
        raise ModelNotFoundError(f"models:/{name}/{ref}: no such version")
    return str(max(int(v.version) for v in versions))


def _resolve_mlflow(uri: str, ctx: ResolveContext) -> Path:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    tracking, registry = mlflow_uris(ctx)
    where = f"registry {_redacted(registry)}" if uri.startswith("models:/") else f"tracking {_redacted(tracking)}"
    try:
        if uri.startswith("models:/"):
            name, ref, sub = parse_models_uri(uri)
            client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
            version = _model_version(client, name, ref)
            fixed = f"models:/{name}/{version}" + (f"/{sub}" if sub else "")
            dst = ctx.cache / "mlflow" / _slug(name) / f"v{version}-{_short_hash(registry, sub)}"
            source = {"uri": uri, "resolved": fixed, "name": name, "version": version,
                      "registry": _redacted(registry)}
        else:
            fixed = uri
            dst = ctx.cache / "mlflow" / "artifacts" / _short_hash(tracking, uri)
            source = {"uri": uri, "tracking": _redacted(tracking)}
        hit = _cached(dst)
        if hit is not None:
            return hit

        def download(tmp: Path) -> None:
            target = fixed
            if uri.startswith("models:/"):
                # the version's artifact location, asked of this registry: MLflow's models:/ download consults the
                # process-wide registry URI instead (in a Ray job: a sqlite file in the job's working directory)
                target = client.get_model_version_download_uri(name, version).rstrip("/") + (f"/{sub}" if sub else "")
            download_artifacts(artifact_uri=target, dst_path=str(tmp), tracking_uri=tracking)

        return _fill_cache(dst, source, download)
    except ModelNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types; say which model failed where
        raise ModelNotFoundError(f"could not fetch {uri} from the MLflow {where}: {exc}") from exc


# --- hf:// ---------------------------------------------------------------------------------------------------------

def _resolve_hf(uri: str, ctx: ResolveContext) -> Path:
    """hf://owner/repo/path[@revision] through the Hugging Face cache (vosr/hub.py)."""
    from vosr.hub import HubError
    from vosr.hub import resolve as hub_resolve

    try:
        return find_checkpoint(hub_resolve(uri))
    except HubError as exc:
        raise ModelNotFoundError(str(exc)) from exc


def _redacted(uri: str) -> str:
    from vosr.config.redact import redact_text

    return redact_text(uri)


register_scheme("file", _resolve_local)
register_scheme("s3", _resolve_s3)
register_scheme("hf", _resolve_hf)
for _scheme in MLFLOW_SCHEMES:
    register_scheme(_scheme, _resolve_mlflow)
