"""Where a run's code came from: the git commit, uncommitted changes and library versions it ran with."""

from __future__ import annotations

import importlib.metadata
import subprocess

from research import names
from research.config import REPO_ROOT

UNTRACKED_TAG_CHARS = 1000  # the git.untracked tag lists untracked files up to this length
LIBRARIES = ("torch", "transformers", "mlflow")  # their versions are tags of every run


def git_info() -> dict[str, str]:
    """Commit, dirtiness and diff of the working tree, so a logged run can be traced to code."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or "none"
        diff = git("diff", "HEAD") if commit != "none" else ""
        untracked = git("ls-files", "--others", "--exclude-standard", "--directory").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown", "diff": "", "untracked": ""}
    return {"commit": commit, "dirty": str(bool(diff.strip())).lower(), "diff": diff, "untracked": bounded_list(untracked, UNTRACKED_TAG_CHARS)}


def bounded_list(items: list[str], limit: int) -> str:
    """Items joined by spaces, cut to about `limit` characters with a count of what was left out."""
    text, shown = "", 0
    for item in items:
        if len(text) + len(item) + 1 > limit:
            return f"{text} ... (+{len(items) - shown} more)".strip()
        text, shown = f"{text} {item}".strip(), shown + 1
    return text


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_tags(exp: str) -> tuple[dict[str, str], str]:
    """Tags every run carries, and the diff of tracked files (logged as git_diff.patch when git.dirty is true)."""
    info = git_info()
    tags = {names.GIT_COMMIT: info["commit"], names.GIT_DIRTY: info["dirty"]}
    if info["untracked"]:
        tags[names.GIT_UNTRACKED] = info["untracked"]
    tags[names.EXPERIMENT] = exp
    tags.update({library: library_version(library) for library in LIBRARIES})
    return tags, info["diff"]
