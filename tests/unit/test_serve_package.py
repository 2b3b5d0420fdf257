"""The serve package's entry points without starting Ray: `inference.serve:app` as Ray Serve's own import_attr
resolves it (the import path of `serve run` and the RayService manifest), built only when asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_path_builds_the_application_only_when_asked(monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve.deployment import Application

    monkeypatch.delenv("VOSR_CONFIG", raising=False)
    monkeypatch.setenv("VOSR_SET", "serve.port=18123")
    assert isinstance(import_attr("inference.serve:app"), Application)
    monkeypatch.setenv("VOSR_SET", "serve.no_such_key=1")
    with pytest.raises(RuntimeError, match="could not be built from VOSR_CONFIG / VOSR_SET: unknown key"):
        import_attr("inference.serve:app")


def test_importing_the_package_builds_nothing_and_loads_no_torch():
    """A bad VOSR_SET does not break `import inference.serve` (the replicas import it), and the HTTP side of the
    package does not pull in torch."""
    code = ("import sys, inference.serve, inference.serve.deployment; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "VOSR_SET": "serve.no_such_key=1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
