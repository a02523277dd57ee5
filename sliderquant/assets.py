"""Where the offline assets live (``shared/assets``: stories260k, WikiText-2 test, C4 excerpt).

Search order: the ``SLIDERQUANT_ASSETS`` environment variable when it is set (then it is the
only place searched: an explicit setting is never silently overridden), else ``../shared/assets``
relative to the repository root (the parent of this package's directory), then
``./shared/assets`` relative to the current directory.  The files are never copied into
the repository.  Named data sets that are not found here are looked for further (the Hugging Face
hub, then an offline fallback text): see ``sources.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SLIDERQUANT_ASSETS"
REPO_ROOT = Path(__file__).resolve().parent.parent   # the checkout; the assets sit beside it


def candidate_dirs() -> list[Path]:
    """The directories searched for assets, in order."""
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR]).expanduser()]
    return [REPO_ROOT.parent / "shared" / "assets", Path.cwd() / "shared" / "assets"]


def assets_dir() -> Path | None:
    """The first existing asset directory, or None."""
    for d in candidate_dirs():
        if d.is_dir():
            return d
    return None


def asset_path(name: str) -> Path:
    """Path of the asset ``name`` (a file or directory); FileNotFoundError says where it looked."""
    dirs = candidate_dirs()
    for d in dirs:
        p = d / name
        if p.exists():
            return p
    looked = ", ".join(str(d / name) for d in dirs)
    raise FileNotFoundError(
        f"offline asset {name!r} not found (looked in: {looked}); set {ENV_VAR} to the "
        f"directory that holds the shared assets (e.g. export {ENV_VAR}=/path/to/shared/assets)")
