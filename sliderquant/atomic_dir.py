"""Write a directory all at once: build it beside its target, then rename it into place.

A ground-floor module (no sliderquant imports) shared by ``sliderquant.save`` and the Hugging Face
directory exports, so that a failed or interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_dir(directory: str):
    """Yield a fresh directory beside ``directory`` to fill; when the block ends without an
    exception, it replaces ``directory`` as a whole (see ``move_into_place``); otherwise it is removed.
    The result has the usual permissions (``mkdtemp`` makes it private; an output is not)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.partial-", dir=parent)
    try:
        yield tmp
        make_readable(tmp)
        move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_readable(tmp: str) -> None:
    """Give ``tmp`` and its entries the permissions the umask gives a new file or directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def move_into_place(tmp: str, directory: str) -> None:
    """Rename the finished ``tmp`` to ``directory``, replacing an earlier output as a whole."""
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.old-",
                           dir=os.path.dirname(os.path.abspath(directory)))
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
