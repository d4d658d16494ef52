"""Component path rules, shared by the client (before registering) and the server (on every request)."""

from __future__ import annotations

import re

MAX_PATH_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255

# ASCII letters, digits and _-+=,@~%. in segments that do not start with "." (so never "." or
# ".."), none longer than MAX_SEGMENT_LENGTH, "/" between them: no rule below can refuse such
# a path, and one regex match is several times cheaper than the full check.
_SEGMENT = rf"[\w\-+=,@~%][\w.\-+=,@~%]{{0,{MAX_SEGMENT_LENGTH - 1}}}"
_PLAIN_PATH = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*", re.ASCII)


def is_plain_path(path: str) -> bool:
    """True for a path seen at once to be a valid component path (and valid UTF-8): ASCII
    only, as above. False says nothing either way: ask ``component_path_problem``."""
    return len(path) <= MAX_PATH_LENGTH and _PLAIN_PATH.fullmatch(path) is not None


def component_path_problem(path: str) -> str | None:
    """Return why ``path`` is not a valid component path, or None when it is.

    A component path is relative, uses POSIX separators, and never leaves the asset:
    no leading ``/``, no ``..`` or ``.`` segment, no empty segment, no NUL, no backslash.
    """
    if isinstance(path, str) and is_plain_path(path):
        return None
    return _full_path_problem(path)


def _full_path_problem(path: str) -> str | None:
    if not isinstance(path, str) or not path:
        return "is empty"
    if "\x00" in path:
        return "contains a NUL byte"
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_LENGTH:
        return f"is longer than {MAX_PATH_LENGTH} bytes"
    if path.startswith("/"):
        return "is absolute (component paths are relative to the asset)"
    if "\\" in path:
        return "contains a backslash (use POSIX '/' separators)"
    for segment in path.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a '{segment}' segment"
        if len(segment.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_LENGTH:
            return f"has a segment longer than {MAX_SEGMENT_LENGTH} bytes"
    return None
