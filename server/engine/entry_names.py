"""What a repository entry's name may be, and whether a path stays inside the repository.

A client names a model; the server turns that name into a directory. A name is therefore a directory name,
never a path: no separators, no "..", no NUL, no percent-escapes — and a directory that is a symlink leading
out of the repository is not an entry (``transerve repo`` commands and the server check the same rules).
"""

from __future__ import annotations

import re
from pathlib import Path

from transerve.server.exceptions import RequestError

ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` still lies under ``root`` once every symlink is followed."""
    return path.resolve().is_relative_to(root.resolve())


def check_entry_name(name: str) -> None:
    if not ENTRY_NAME.fullmatch(name):
        raise RequestError(f"model_name: {name!r} is not a repository entry name (1 to 128 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit; no path)")
