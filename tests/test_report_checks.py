"""demo/report.py (issue 17): the two fidelity checks with their numbers instead of the bicubic bar, the
perception-distortion position of bicubic, peer and VOSR rows, and the grid with the peers' column."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def _row(label, group, psnr, stlpips, guidance=None, kind=None):
    r = {"label": label, "group": group, "guidance": guidance, "options": {}, "seconds": 1.0,
         "metrics": {"psnr": psnr, "ssim": 0.5, "stlpips": stlpips}}
    if kind:
        r["kind"] = kind
    return r


def _eval_folder(out: Path, teacher_psnr: list[float], student_psnr: float) -> None:
    rows = [_row("Bicubic", "Baseline", 27.0, 0.40), _row("DAT-light", "Peer", 28.5, 0.30, kind="peer")]
    rows += [_row(f"VOSR-tiny-ms (s={s:g})", "Multi-step", p, 0.2 + 0.05 * i, guidance=s)
             for i, (s, p) in enumerate(zip([0.5, 0.0, 1.0], teacher_psnr))]
    rows.append(_row("VOSR-tiny-os", "One-step", student_psnr, 0.22))
    hr = out / "holdout"
    hr.mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (40, 40), (100, 120, 140)).save(hr / f"{name}.png")
        for r in rows:
            folder = out / "eval" / "images" / r["label"].replace(" ", "_").replace("(", "").replace(")", "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (90, 110, 130)).save(folder / f"{name}.png")
    summary = {"rows": rows, "data": {"images": 2, "crop": 32, "scale": 4, "hr_dir": str(hr),
                                      "lr_source": "degrade:realesrgan"},
               "metric_files": {"stlpips": {"file": "/x/alex_shift_tolerant.pth", "sha256": "ab" * 32,
                                            "via": "vosr loader (iqa_local)"}},
               "peers": [{"name": "DAT-light", "architecture": "DAT", "scale": 4, "path": "/x/DAT_light_x4.pth",
                          "sha256": "cd" * 32, "params": 573000}],
               "metrics_skipped": {"niqe": "no file"}}
    (out / "eval" / "summary.json").write_text(json.dumps(summary))


def test_checks_met_and_pd_front(tmp_path):
    from demo.report import write_report

    out = tmp_path / "demo"
    _eval_folder(out, teacher_psnr=[25.0, 24.0, 26.0], student_psnr=24.5)   # s=0: 24, s=0.5: 25, s=1: 26
    write_report(out)
    md = (out / "report.md").read_text()
    assert "Quality bar" not in md and "beat bicubic" not in md
    assert "PSNR-Y rises with the guidance scale s" in md and "**met** (s=0: 24.000 dB, s=0.5: 25.000 dB" in md
    assert "+2.000 dB from the smallest to the largest s" in md
    # student 24.5 vs the teacher at the configured s (0.5, the first teacher row) 25.0: -0.5 dB, within 1 dB
    assert "within 1 dB of its teacher" in md and "-0.500 dB" in md
    report = json.loads((out / "report.json").read_text())
    checks = report["fidelity_checks"]
    assert checks["guidance_rises"]["met"] and checks["student_within_teacher"]["met"]
    # front on (PSNR-Y up, ST-LPIPS down): the peer (28.5, 0.30), s=1 teacher (26, 0.30)? dominated by the peer;
    # s=0.5 teacher (25, 0.20) and the student (24.5, 0.22)? dominated by s=0.5; bicubic dominated by the peer
    assert report["perception_distortion"]["front"] == ["DAT-light", "VOSR-tiny-ms (s=0.5)"]
    assert "DAT-light (peer, 28.50 dB)" in md and "What the tiny preset can show" in md
    assert (out / "report_assets" / "perception_distortion.png").is_file()
    assert "| DAT-light | peer |" in md and "peer DAT-light: DAT x4" in md and "alex_shift_tolerant.pth" in md
    grid = Image.open(out / "report_assets" / "grid.png")
    assert grid.size[0] == 192 * 5                   # bicubic | peer | teacher | student | HR


def test_checks_not_met(tmp_path):
    from demo.report import write_report

    out = tmp_path / "demo"
    _eval_folder(out, teacher_psnr=[25.0, 25.5, 26.0], student_psnr=23.5)   # s=0 above s=0.5; student -1.5 dB
    write_report(out)
    md = (out / "report.md").read_text()
    checks = json.loads((out / "report.json").read_text())["fidelity_checks"]
    assert not checks["guidance_rises"]["met"] and not checks["student_within_teacher"]["met"]
    assert md.count("**NOT met**") == 2 and "-1.500 dB" in md
