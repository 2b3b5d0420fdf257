"""The evaluation runner: paired folders and degraded HR, Table-1 markdown, the guidance sweep plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobkit.config import config_from_dict
from tests.helpers.checkpoints import make_checkpoint
from vosr.metrics import psnr_y

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    return make_checkpoint(root / "student", True), make_checkpoint(root / "teacher", False)


@pytest.fixture(scope="module")
def hr_folder(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "HR").mkdir()
    for p in photos[:3]:
        img = Image.open(p).convert("RGB")
        left, top = img.width // 2 - 50, img.height // 2 - 45
        img.crop((left, top, left + 100, top + 90)).save(root / "HR" / f"{p.stem}.png")
    return root


def test_degraded_hr_with_all_rows(models, hr_folder, tmp_path):
    from inference.evaluate import main, run

    student, teacher = models
    out = tmp_path / "eval"
    cfg = config_from_dict({}, [f"eval.hr_dir={hr_folder / 'HR'}", "eval.degrade_preset=bicubic", "eval.crop=64",
                                f"eval.output={out}", f"inference.checkpoint={student}", f"eval.teacher={teacher}",
                                "eval.guidance_sweep=[-0.5, 1.0]", "eval.sweep_steps=2", "inference.device=cpu",
                                "eval.save_images=true", "run.mlflow.enabled=false"])
    summary = run(cfg)
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["Bicubic", "VOSR-tiny-os", "VOSR-tiny-ms (s=0.5)", "VOSR-tiny-ms (s=-0.5)",
                      "VOSR-tiny-ms (s=1)"]
    assert summary["data"]["images"] == 3 and summary["data"]["lr_source"] == "degrade:bicubic"
    # pyiqa is an optional extra and no local metric file is named: every perceptual metric is reported as skipped
    # with the reason (for stlpips/niqe: the file names looked for and where)
    assert set(summary["metrics_skipped"]) == {"lpips", "stlpips", "dists", "niqe", "musiq", "maniqa", "topiq_nr",
                                               "afine"}
    assert all("pyiqa" in reason for reason in summary["metrics_skipped"].values())
    assert "alex_shift_tolerant.pth" in summary["metrics_skipped"]["stlpips"]
    assert [r["kind"] for r in summary["rows"]] == ["bicubic", "student", "teacher", "teacher", "teacher"]
    # the bicubic row is recomputed independently from the saved images and the degraded LR (seeded: stable)
    saved = json.loads((out / "summary.json").read_text())
    name = sorted(saved["per_image"]["Bicubic"])[0]
    sr = np.asarray(Image.open(out / "images" / "Bicubic" / f"{name}.png"))
    assert sr.shape == (64, 64, 3)
    hr = np.asarray(Image.open(hr_folder / "HR" / f"{name}.png").convert("RGB"))[13:77, 18:82]
    assert saved["per_image"]["Bicubic"][name]["psnr"] == pytest.approx(psnr_y(hr, sr, border=4), abs=1e-9)
    bicubic = summary["rows"][0]["metrics"]
    assert 15 < bicubic["psnr"] < 70 and 0 < bicubic["ssim"] < 1
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| Dataset | Setting | Method | PSNR↑ | SSIM↑ | LPIPS↓")
    assert "| One-step | VOSR-tiny-os |" in table and "n/a" in table and "Skipped metrics" in table
    png = Image.open(out / "guidance_sweep.png")
    assert png.size[0] > 300 and summary["plot_metrics"] == "psnr+ssim"
    # the same run from the command line gives the same bicubic numbers (seeded degradation)
    assert main(["--set", f"eval.hr_dir={hr_folder / 'HR'}", "--set", "eval.degrade_preset=bicubic", "--set",
                 "eval.crop=64", "--set", f"eval.output={tmp_path / 'again'}", "--set", "run.mlflow.enabled=false"]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["rows"][0]["metrics"] == summary["rows"][0]["metrics"]
    assert [r["label"] for r in again["rows"]] == ["Bicubic"]


def test_paired_folders_and_reasons(models, hr_folder, tmp_path):
    from inference.evaluate import run

    student, _ = models
    bench = tmp_path / "paired"
    (bench / "HR").mkdir(parents=True)
    (bench / "LR").mkdir()
    names = sorted(p.stem for p in (hr_folder / "HR").iterdir())
    for n in names[:2]:
        hr = Image.open(hr_folder / "HR" / f"{n}.png")
        hr.save(bench / "HR" / f"{n}.png")
        hr.resize((25, 22), Image.BICUBIC).save(bench / "LR" / f"{n}.png")     # HR is mod-cropped to 100 x 88
    Image.open(hr_folder / "HR" / f"{names[2]}.png").save(bench / "HR" / "lonely.png")
    (bench / "HR" / "broken.png").write_bytes(b"\x89PNG not really")
    (bench / "LR" / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = config_from_dict({}, [f"eval.hr_dir={bench}", f"eval.output={tmp_path / 'out'}",
                                f"inference.checkpoint={student}", "inference.device=cpu", "run.mlflow.enabled=false"])
    summary = run(cfg)
    assert summary["data"]["lr_source"] == "paired" and summary["data"]["images"] == 2
    assert summary["data"]["skipped"]["lonely"] == "no LR partner"
    assert summary["data"]["skipped"]["broken"].startswith("decode")
    assert summary["plot"] is None                        # no teacher: no sweep
    assert [r["label"] for r in summary["rows"]] == ["Bicubic", "VOSR-tiny-os"]
    assert summary["dataset"] == "paired"
    # a teacher given as inference.checkpoint (as the demo chain does) gives the multi-step rows and the sweep;
    # this run is tracked in MLflow (sqlite under the output root)
    cfg = config_from_dict({}, [f"eval.hr_dir={bench}", f"eval.output={tmp_path / 'out2'}",
                                f"inference.checkpoint={models[1]}", "inference.mode=multistep",
                                "eval.guidance_sweep=[0.0]", "eval.sweep_steps=1", "inference.device=cpu",
                                f"run.output_root={tmp_path / 'runs'}"])
    summary = run(cfg)
    assert [r["label"] for r in summary["rows"]] == ["Bicubic", "VOSR-tiny-ms (s=0.5)", "VOSR-tiny-ms (s=0)"]
    assert summary["plot"] and summary["models"] == {"teacher": models[1]}
    import mlflow

    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert logged.data.metrics["Bicubic/psnr"] == pytest.approx(summary["rows"][0]["metrics"]["psnr"])
    assert "VOSR-tiny-ms_s_0.5/ssim" in logged.data.metrics


def test_s3_photos_model_and_output(models, hr_folder, tmp_path, monkeypatch):
    """eval.hr_dir, the checkpoint and eval.output all on s3:// (a real moto server on loopback): photos listed and
    read from S3 (only the folder's direct images), outputs uploaded there and named by their s3:// URIs, nothing
    left locally; the bicubic numbers equal a local run's on the same photos."""
    from inference.evaluate import run
    from tests.helpers.s3_fixture import s3_server

    student, _ = models
    names = sorted(p.name for p in (hr_folder / "HR").iterdir())[:2]
    local_bench = tmp_path / "local"
    local_bench.mkdir()
    with s3_server() as s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
        monkeypatch.setenv("VOSR_MODEL_CACHE", str(tmp_path / "cache"))
        for n in names:
            s3.put_file(hr_folder / "HR" / n, f"bench/HR/{n}")
            (local_bench / n).write_bytes((hr_folder / "HR" / n).read_bytes())
        s3.put_file(hr_folder / "HR" / names[0], "bench/HR/nested/not-this.png")    # not a direct child
        s3.put_bytes(b"notes", "bench/HR/README.txt")
        for f in sorted(Path(student).iterdir()):
            s3.put_file(f, f"models/student/{f.name}")
        common = ["eval.degrade_preset=bicubic", "eval.crop=64", "inference.device=cpu", "eval.save_images=true",
                  "run.mlflow.enabled=false"]
        cfg = config_from_dict({}, [f"eval.hr_dir={s3.uri('bench')}", f"eval.output={s3.uri('results/eval')}",
                                    f"inference.checkpoint={s3.uri('models/student')}", *common])
        summary = run(cfg)
        keys = s3.keys("results/eval/")
        saved = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="results/eval/summary.json")["Body"].read())
    assert summary["data"]["images"] == 2 and summary["dataset"] == "bench"
    assert summary["data"]["hr_dir"] == "s3://vosr-test/bench/HR"
    assert [r["label"] for r in summary["rows"]] == ["Bicubic", "VOSR-tiny-os"]
    assert summary["models"] == {"student": "s3://vosr-test/models/student"}
    assert summary["summary_json"] == "s3://vosr-test/results/eval/summary.json"
    assert saved["table"] == "s3://vosr-test/results/eval/table.md" and saved["output"] == "s3://vosr-test/results/eval"
    assert saved["per_image_csv"] == "s3://vosr-test/results/eval/per_image.csv"
    stems = sorted(n.rsplit(".", 1)[0] for n in names)
    expected = {"results/eval/summary.json", "results/eval/table.md", "results/eval/per_image.csv",
                *(f"results/eval/images/{row}/{s}.png" for row in ("Bicubic", "VOSR-tiny-os") for s in stems)}
    assert set(keys) == expected and summary["uploaded"] == len(expected)
    assert sorted(saved["per_image"]["Bicubic"]) == stems
    assert not list(tmp_path.glob("**/summary.json")), "evaluation output was written locally"

    local = run(config_from_dict({}, [f"eval.hr_dir={local_bench}", f"eval.output={tmp_path / 'out'}", *common]))
    assert local["rows"][0]["metrics"] == summary["rows"][0]["metrics"]
