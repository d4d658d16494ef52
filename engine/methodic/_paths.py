"""Component path rules, shared by the client (before registering) and the server (on every request)."""

from __future__ import annotations

MAX_PATH_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255


def component_path_problem(path: str) -> str | None:
    """Return why ``path`` is not a valid component path, or None when it is.

    A component path is relative, uses POSIX separators, and never leaves the asset:
    no leading ``/``, no ``..`` or ``.`` segment, no empty segment, no NUL, no backslash.
    """
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
