"""The one error tree of methodic: everything it raises on purpose is a ChronicleError."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ChronicleError(Exception):
    """Base of every error methodic raises on purpose. Messages say what to do next."""


class AuthenticationError(ChronicleError):
    """The server refused the API key (missing, wrong or revoked)."""


class NotFoundError(ChronicleError):
    """The experiment, run or asset does not exist on the server."""


class ConflictError(ChronicleError):
    """The request contradicts what the server already holds: an asset id reused with another
    manifest, discarding a finalized asset, force-finalizing files that changed since sent."""


class AssetIncompleteError(ChronicleError):
    """Finalize was refused because storage does not hold every component yet."""

    def __init__(
        self,
        message: str,
        missing: Sequence[str] = (),
        parts_missing: Mapping[str, Sequence[int]] | None = None,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing: list[str] = list(missing)
        self.reasons: dict[str, str] = dict(reasons or {})  # why each is missing
        # For a parted component: which of its parts storage lacks (or holds damaged).
        self.parts_missing: dict[str, list[int]] = {
            path: list(parts) for path, parts in (parts_missing or {}).items()
        }

    @property
    def busy(self) -> bool:
        """Nothing is missing but bodies the server is still receiving (finalize again later)."""
        return bool(self.missing) and all(
            self.reasons.get(p) == "upload in progress" for p in self.missing
        )


class UploadFailedError(ChronicleError):
    """An upload gave up after its retries; ``cause`` is the last error seen."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class InvalidInputError(ChronicleError, ValueError):
    """Bad input from the caller (a path, an option); nothing was registered or sent."""


class TrackerError(ChronicleError):
    """The upload tracker database cannot be used (damaged, newer schema, read-only, full disk)."""


class ServerError(ChronicleError):
    """The server answered with an error methodic does not map to a narrower type."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class DownloadError(ChronicleError):
    """A download stopped: ``path`` names the component, ``cause`` says why in one word
    (``disk_full``, ``permission``, ``name_too_long``, ``refused``, ``corrupt``, ``network``,
    ``filesystem``). What was verified stays, and a second call fetches only the rest."""

    def __init__(self, message: str, path: str | None = None, cause: str = "filesystem") -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause
