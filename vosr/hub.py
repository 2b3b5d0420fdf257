"""Hugging Face Hub URIs, `hf://owner/repo[/path][@revision]`, as local paths (a file or a folder).

Only what a URI names is fetched: `huggingface_hub.snapshot_download` with `allow_patterns` set to that path (a
file, or a folder and everything below it) into Hugging Face's own cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), so a second use reads the cache. With HF_HUB_OFFLINE=1 nothing is downloaded: the cache
answers, and a URI it does not hold fails naming the cache folder. The revision is a branch, tag or commit
(`hf://CSWRY/VOSR/VOSR_0.5B_os@main`; `hf://CSWRY/VOSR@v1/VOSR_0.5B_os` also works); without one, `main`.

The released VOSR models (vosr/released.py) are one folder each in the authors' repository, e.g.
`hf://CSWRY/VOSR/VOSR_0.5B_os`; the encoders they need are separate entries of the same repository
(`hf://CSWRY/VOSR/stable-diffusion-2-1-base`, `.../sd21_lwdecoder.pth`, `.../Qwen-Image-vae-2d`,
`.../torch_cache`): they are fetched only when named, never as a side effect of fetching a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SCHEME = "hf://"
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(FileNotFoundError):
    """An hf:// URI that could not be resolved to a local path; the message says why and what to do."""


@dataclass(frozen=True)
class HubURI:
    repo_id: str
    path: str          # "" = the whole repository
    revision: str | None

    def __str__(self) -> str:
        tail = f"/{self.path}" if self.path else ""
        return f"{SCHEME}{self.repo_id}{tail}" + (f"@{self.revision}" if self.revision else "")


def is_hub_uri(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def parse(uri: str) -> HubURI:
    """`hf://owner/repo[/path][@revision]` (or `hf://owner/repo@revision/path`) -> HubURI."""
    if not is_hub_uri(uri):
        raise HubError(f"{uri!r} is not an hf:// URI (hf://owner/repo[/path][@revision])")
    rest = uri[len(SCHEME):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"{uri}: expected hf://owner/repo[/path][@revision]")
    revision = None
    owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    elif "@" in path:
        path, revision = path.rsplit("@", 1)
    if revision is not None and not revision:
        raise HubError(f"{uri}: empty revision after '@'")
    if not repo or any(p in ("", ".", "..") for p in path.split("/") if path):
        raise HubError(f"{uri}: bad repository path")
    return HubURI(f"{owner}/{repo}", path.strip("/"), revision)


def offline() -> bool:
    """HF_HUB_OFFLINE set (read at call time, not at import of huggingface_hub)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def cache_dir() -> Path:
    """Hugging Face's cache folder for models, as huggingface_hub resolves it (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve(uri: str) -> Path:
    """The local path of what `uri` names: read from the cache, downloaded first unless offline."""
    ref = parse(uri)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # a core dependency of diffusers, so normally present
        raise HubError(f"{uri}: huggingface_hub is not installed ({exc})") from exc
    patterns = [ref.path, f"{ref.path}/*"] if ref.path else None
    where = cache_dir()
    is_offline = offline()
    try:
        snapshot = Path(snapshot_download(repo_id=ref.repo_id, revision=ref.revision, cache_dir=str(where),
                                          allow_patterns=patterns, local_files_only=is_offline))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types (offline, not found, auth, network)
        mode = ("HF_HUB_OFFLINE is set and the local cache does not hold it" if is_offline
                else "it could not be downloaded")
        raise HubError(f"{ref}: {mode} (cache {where}): {type(exc).__name__}: {str(exc)[:300]}. Fetch it once "
                       "with network access, or point at a local copy instead.") from exc
    local = snapshot / ref.path if ref.path else snapshot
    if not local.exists():
        raise HubError(f"{ref}: {ref.path!r} is not in {ref.repo_id} at revision {ref.revision or 'main'}"
                       + (f" or not in the local cache {where} (HF_HUB_OFFLINE is set)" if is_offline else ""))
    return local


def localize(path: str) -> str:
    """`path` unchanged unless it is an hf:// URI, which is resolved to its local path (a config key's value)."""
    return str(resolve(path)) if is_hub_uri(path) else path


__all__ = ["HubError", "HubURI", "SCHEME", "cache_dir", "is_hub_uri", "localize", "offline", "parse", "resolve"]
