"""The README's "On a cluster" section as commands: what tests/e2e/test_cluster_readme.py runs as written and
tests/unit/test_readme_cluster_section.py checks without running."""

from __future__ import annotations

from pathlib import Path

from jobkit.jobs import submitted

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- cluster-begin -->", "<!-- cluster-end -->"
JOBS = {job.name: job.script for job in submitted()}  # curate -> ... -> evaluate (jobkit/jobs.py)


def readme_commands(text: str | None = None) -> list[str]:
    """The section's indented code lines, one command per entry (backslash continuations kept, as bash reads them)."""
    text = README.read_text() if text is None else text
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} ... {END} section"
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    commands, current = [], ""
    for line in section.splitlines():
        if line.startswith("    "):
            current = f"{current}\n{line[4:]}" if current else line[4:]
            if not current.rstrip().endswith("\\"):
                commands.append(current)
                current = ""
        elif line.strip():
            assert not current, f"a command ends with a backslash before prose: {current!r}"
    return commands


def job_of(cmd: str) -> str | None:
    if not cmd.startswith("ray job submit"):
        return None
    found = [name for name, script in JOBS.items() if f" python {script} " in cmd.replace("\n", " ") + " "]
    assert len(found) == 1, cmd
    return found[0]
