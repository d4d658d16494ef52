"""What a manifest may hold: asset id, component paths, sizes and parts this server accepts."""

from __future__ import annotations

import re
from collections.abc import Sequence

from methodic._paths import component_path_problem, is_plain_path
from methodic.server.bulk import too_many_components
from methodic.server.config import ServerConfig
from methodic.server.errors import invalid, too_large
from methodic.server.models import AssetCreate, ComponentIn
from methodic.server.storage.base import StorageLimits, part_count

ASSET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _path_problem(path: str) -> str | None:
    problem = component_path_problem(path)
    if problem is None:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    return problem


def validate_manifest(spec: AssetCreate, config: ServerConfig, limits: StorageLimits) -> None:
    """Raise APIError (400, 413) unless this server can take the manifest as it is."""
    if not ASSET_ID_PATTERN.fullmatch(spec.asset_id):
        raise invalid(
            f"asset id {spec.asset_id[:200]!r} is not valid: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (a UUID fits)"
        )
    if len(spec.components) > config.max_components_per_asset:
        raise too_many_components(len(spec.components), config.max_components_per_asset)
    validate_components(spec.components, config, limits)


def validate_components(
    components: Sequence[ComponentIn], config: ServerConfig, limits: StorageLimits
) -> None:
    """Raise APIError (400, 413) unless every entry's path, size and parts are acceptable, no
    path appears twice and none is a file another needs as a directory."""
    seen: set[str] = set()
    for component in components:
        path = component["path"]
        if not is_plain_path(path):  # most paths are decided by this one match
            problem = _path_problem(path)
            if problem is not None:
                raise invalid(f"component path {path[:300]!r} {problem}", path=path[:1024])
        if path in seen:
            raise invalid(f"component path {path!r} appears twice in the manifest", path=path)
        seen.add(path)
        part_size = component.get("part_size")
        parts = part_count(component["size"], part_size)
        if parts > config.max_parts_per_component:
            raise too_large(
                f"component {path!r} would be sent in {parts} parts; at most "
                f"{config.max_parts_per_component} are accepted (use a larger part_size)"
            )
        _check_storage_limits(path, component["size"], part_size, parts, limits)
    # A path cannot be a file and a directory of the same download.
    for path in seen:
        head = path
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            if head in seen:
                raise invalid(
                    f"component path {head!r} is a file but {path!r} needs it to be a directory",
                    path=path,
                )


def _check_storage_limits(
    path: str, size: int, part_size: int | None, parts: int, limits: StorageLimits
) -> None:
    name = path[:300]
    if part_size is None:
        if limits.max_single_put is not None and size > limits.max_single_put:
            raise invalid(
                f"component {name!r} has {size} bytes, over this server's storage "
                f"limit of {limits.max_single_put} for one PUT: send it in parts (part_size)",
                path=name,
            )
        return
    if parts > 1 and part_size < limits.min_part_size:
        raise invalid(
            f"component {name!r}: part_size {part_size} is below this server's "
            f"storage minimum of {limits.min_part_size} bytes per part",
            path=name,
        )
    if limits.max_part_size is not None and part_size > limits.max_part_size:
        raise invalid(
            f"component {name!r}: part_size {part_size} is over this server's "
            f"storage maximum of {limits.max_part_size} bytes per part",
            path=name,
        )
