"""demo/report.py: the two fidelity checks with their numbers instead of the bicubic bar, the
perception-distortion position of bicubic, peer and VOSR rows, and the grid with the peers' column."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
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


class _Page(HTMLParser):
    """The page's visible words, its tables (rows of cell text) and its pictures; and any external resource."""

    def __init__(self):
        super().__init__()
        self.text, self.tables, self.images, self.external, self._skip = [], [], [], [], 0
        self._cell = None

    @property
    def words(self):
        return "".join(self.text).split()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._skip += tag in ("style", "title")
        if tag not in ("code", "b", "em"):           # a block: a word boundary
            self.text.append(" ")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append((a["alt"], a["src"]))
        if tag in ("link", "script") or "://" in (a.get("src") or "") or "://" in (a.get("href") or ""):
            self.external.append(tag)

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "title")
        if tag not in ("code", "b", "em"):
            self.text.append(" ")
        if tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)
            if self._cell is not None:
                self._cell.append(data)


def _md_plain(text: str) -> str:
    """Markdown text without its markup: pictures, code/bold/italic marks, table rules, list and heading marks."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)
    lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\|( *-+:? *\|)+", ln)]
    lines = [" ".join(ln.strip("|").split(" | ")) if ln.startswith("|") else re.sub(r"^(#+ |- )", "", ln)
             for ln in lines]
    return re.sub(r"`|\*\*|\*", "", "\n".join(lines))


def test_html_page_is_the_markdown_escaped(tmp_path):
    """report.html (the Jinja template) shows what report.md shows, word for word and table for table, with text
    from the data escaped, pictures by relative path, and nothing fetched from elsewhere."""
    from demo.report import write_report

    out = tmp_path / "demo"
    _eval_folder(out, teacher_psnr=[25.0, 24.0, 26.0], student_psnr=24.5)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    summary["rows"][-1]["label"] = "VOSR-tiny-os <one step> & co"
    (out / "eval" / "summary.json").write_text(json.dumps(summary))
    (out / "summaries").mkdir()
    (out / "summaries" / "pretrain.json").write_text(json.dumps(
        {"seconds": 2.0, "summary": {"steps": 4, "global_batch": 2, "num_workers": 1, "samples_per_s": 1.5,
                                     "registered_model": {"uri": "models:/vosr<b>&x/1"}}}))
    (out / "serve").mkdir()
    for name in ("request", "answer"):
        Image.new("RGB", (8, 8)).save(out / "serve" / f"{name}.png")
    write_report(out, {"urls": 3, "expected": {"ok": 3}}, holdout=["a.png", "b.png"], student="models:/s&t/1")
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    for raw, escaped in (("VOSR-tiny-os <one step> & co", "VOSR-tiny-os &lt;one step&gt; &amp; co"),
                         ("models:/vosr<b>&x/1", "<code>models:/vosr&lt;b&gt;&amp;x/1</code>"),
                         ("models:/s&t/1", "<code>models:/s&amp;t/1</code>")):
        assert raw in md and raw not in page and escaped in page
    assert "<em>randomly initialised</em>" in page and page.count("<b>met</b>") == 2
    html = _Page()
    html.feed(page)
    assert html.words == _md_plain(md).split()                 # the same words in the same order
    md_tables = re.findall(r"(?:^\|.*\|\n)+", md, flags=re.M)
    assert len(md_tables) == len(html.tables) == 3             # stages, evaluation, endpoint
    for block, table in zip(md_tables, html.tables):
        rows = [[_md_plain(c).strip() for c in ln.strip("|").split(" | ")] for ln in block.splitlines()
                if not re.fullmatch(r"\|( *-+:? *\|)+", ln)]
        assert rows == table
    assert [t[0] for t in html.tables[:2]] == [["stage", "wall time (s)", "what it did"],
                                               ["method", "kind", "guidance s", "steps", "PSNR-Y (dB)", "SSIM-Y",
                                                "ST-LPIPS", "NIQE", "seconds"]]
    assert len(html.tables[1]) == 1 + len(summary["rows"])
    pictures = re.findall(r"!\[([^\]]*)\]\(([^)]*)\)", md)
    assert html.images == pictures and len(pictures) == 4      # pd plane, grid, request, answer
    assert all((out / src).is_file() and not Path(src).is_absolute() for _, src in html.images)
    assert html.external == []
