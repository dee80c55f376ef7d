"""Provenance: versions, machine and git state recorded beside every result (a run, a fold job, a report, a bundle)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from tlese.version import __version__


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        completed = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def environment_info(repo_dir=None) -> dict:
    """Versions, machine and git state, for the report (everything a reader needs to rerun the numbers)."""
    repo_dir = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], repo_dir)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo_dir) if commit else None
    info = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "tlese": __version__,  # the running code's own version (an editable install's metadata can lag behind)
        "torch": _package_version("torch"),
        "torchvision": _package_version("torchvision"),
        "numpy": _package_version("numpy"),
        "pandas": _package_version("pandas"),
        "scikit-learn": _package_version("scikit-learn"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
    }
    # GPU details only when the caller already imported torch (training does): importing it here costs seconds.
    torch = sys.modules.get("torch")
    if torch is not None:
        info["cuda"] = torch.version.cuda or "none"
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info
