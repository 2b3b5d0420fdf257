"""Every repository path and module the documentation names exists: file paths such as `training/memory_plan.py`
or `docs/scale.md`, and dotted modules such as `training.memory_plan` or `vosr.flow.training_loss`, in the
Markdown files, the docstrings and comments of the Python sources, and the comments of the configs, manifests,
scripts and Makefile."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "outputs")
PACKAGES = [d for d in TOP if (ROOT / d / "__init__.py").is_file()]
EXT = r"(?:py|md|yaml|yml|sh|toml|txt|tsv|json|html|cfg)"
PATH = re.compile(rf"(?<![\w/.~$<>*-])((?:\.\./|\./)?(?:[\w.-]+/)+[\w.-]+\.{EXT}|[A-Z][A-Z_]+\.md)(?![\w/*{{<]|\.\w)")
MODULE = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)(?![\w/-]|\.{EXT}\b)")
SUFFIXES = (".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".cfg")


def _files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith(SUFFIXES) or Path(f).name in ("Makefile", "Dockerfile", "run")]


def _prose(f: Path) -> str:
    """What of a file is written for readers: all of a Markdown file; a Python file's docstrings and comments;
    the comments of the other files."""
    text = f.read_text(errors="replace")
    if f.suffix == ".md":
        return text
    if f.suffix == ".py":
        parts = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                parts.append(ast.get_docstring(node, clean=False) or "")
        return "\n".join(parts)
    return "\n".join(line[line.index("#"):] for line in text.splitlines() if "#" in line)


def _string_keys(files: list[Path]) -> set[str]:
    """Dotted names the code uses as string keys (MLflow tags, Parquet metadata: "vosr.preset", "vosr.shape")."""
    pattern = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)+")
    out = set()
    for f in files:
        if f.suffix == ".py":
            for node in ast.walk(ast.parse(f.read_text(errors="replace"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.update(m.group(0) for m in pattern.finditer(node.value))
    return out


def _config_keys() -> set[str]:
    from jobkit.config import Config
    from vosr.config.schema import flatten

    keys = set()
    for key in flatten(dataclasses.asdict(Config())):
        parts = key.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return keys


def _path_exists(token: str, source: Path) -> bool:
    if re.fullmatch(r"[A-Z][A-Z_]+\.md", token):
        return any(ROOT.rglob(token)) if not (source.parent / token).exists() else True
    first = token.removeprefix("./").split("/")[0]
    if first not in TOP and first != "..":
        return True  # not a path of this repository (a user's folder, the reference code's layout, a URL part)
    return (ROOT / token).exists() or (source.parent / token).exists()


def _defines(module: Path, name: str) -> bool:
    text = module.read_text()
    if module.name == "__init__.py":
        return re.search(rf"\b{name}\b", text) is not None  # defined or re-exported by the package
    return bool(re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^from\s+\S+\s+import\s+.*\b{name}\b"
                          rf"|^import\s+.*\b{name}\b|^\s+{name}\s*[:=]", text, re.M))


def _module_exists(token: str) -> bool:
    parts = token.split(".")
    here = ROOT / parts[0]
    for part in parts[1:]:
        if (here / part).is_dir() and (here / part / "__init__.py").is_file():
            here = here / part
        elif (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
        else:
            module = here / "__init__.py" if here.is_dir() else here
            return _defines(module, part)  # a name defined in the last module (its attributes are not checked)
        if here.suffix == ".py":
            rest = parts[parts.index(part) + 1:]
            return not rest or _defines(here, rest[0])
    return True


def test_every_named_path_and_module_exists():
    files = _files()
    keys = _config_keys() | _string_keys(files)
    missing = []
    for f in files:
        text = _prose(f)
        rel = f.relative_to(ROOT)
        for m in PATH.finditer(text):
            if not _path_exists(m.group(1), f):
                missing.append(f"{rel}: {m.group(1)}")
        for m in MODULE.finditer(text):
            token = m.group(1)
            if re.search(rf"\.{EXT}$", token) or token in keys or token.split(".")[0] + "." + token.split(".")[1] in keys:
                continue  # a config key (the inference section shares its name with the package)
            if not _module_exists(token):
                missing.append(f"{rel}: {token}")
    assert not missing, "named but not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_the_check_tells_missing_names_from_present_ones():
    doc = ROOT / "docs" / "scale.md"
    assert _path_exists("docs/gpu-memory.md", doc) and _path_exists("training/memory_plan.py", doc)
    assert _path_exists("../README.md", doc) and _path_exists("/models/sd21-vae/config.json", doc)
    assert not _path_exists("docs/nowhere.md", doc) and not _path_exists("training/nowhere.py", doc)
    assert not _path_exists("ARCHITECTURE.md", doc)  # the design documents are not in the repository
    assert _module_exists("training.memory_plan") and _module_exists("vosr.flow.training_loss")
    assert _module_exists("inference.serve.MODEL_DEPLOYMENT")  # re-exported by the package
    assert not _module_exists("training.nowhere") and not _module_exists("vosr.flow.no_such_function")
    found = [m.group(1) for m in PATH.finditer("see docs/scale.md. and demo/templates/report.html.j2, `a/b.py`")]
    assert found == ["docs/scale.md", "a/b.py"]
    assert _path_exists("a/b.py", doc)  # not a folder of this repository: an example, not checked


def test_every_figure_of_the_readme_names_a_script_that_exists_and_a_date():
    """The README's one table of measured figures: each row's command runs a script of benchmarks/ (or a make
    target) and carries the day it was measured (or says why it is not measured)."""
    text = (ROOT / "README.md").read_text()
    header = "| what | command | measured | target | date |"
    assert text.count(header) == 1
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    assert len(rows) > 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 5, row
        scripts = re.findall(r"`(?:\.\.\. )?([\w-]+\.py)\b", cells[1])
        assert scripts or cells[1].startswith("`make "), row
        assert all((ROOT / "benchmarks" / s).is_file() for s in scripts), row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cells[4]) or cells[2].startswith("not measured"), row
