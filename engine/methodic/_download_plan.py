"""How one component is fetched and verified: its byte ranges, and what their digests must make.

A component's published checksum is derived from the digests of its ranges (``_checksum``):
a file sent in parts has the combined CRC (crc64nvme) or the composite digest of its parts'
digests (sha256, blake3); a file sent whole has its plain digest. So a file is fetched as the
ranges its checksum was derived over, each hashed on its own as it arrives (in any order, by
any connection), and the file is verified from their digests without reading it again. A CRC
combines over any split, so a large crc64nvme file sent whole is still fetched in ranges; a
sha256/blake3 file sent whole is one range, hashed in order. A whole-file sha256 declared by
the uploader besides another checksum is hashed in order too when the file is one range, or
read back once when it is several.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from methodic import _checksum as checksums
from methodic._api import DownloadTarget

RANGE_SIZE = 16 << 20  # the ranges of a large crc64nvme file sent whole


@dataclass
class Span:
    """One byte range of a component: fetched by one request at a time, resumed where it cut."""

    offset: int
    length: int
    got: int = 0  # bytes of it written and hashed so far (this process)
    hashers: list[checksums.Hasher] = field(default_factory=list)


@dataclass
class FilePlan:
    target: DownloadTarget
    algorithm: str | None  # of ``spans``' digests; None: the server published no checksum
    parted: bool  # the checksum is combined/composite over the spans
    spans: list[Span]
    # The declared whole-file sha256 to check besides: hashed in order (one span) or read back.
    sha256: str | None = None

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def size(self) -> int:
        return self.target.size

    @property
    def read_back(self) -> bool:
        return self.sha256 is not None and len(self.spans) > 1

    def new_hashers(self, span: Span) -> list[checksums.Hasher]:
        out = [] if self.algorithm is None else [checksums.new_hasher(self.algorithm)]
        if self.sha256 is not None and not self.read_back:
            out.append(checksums.new_hasher(checksums.SHA256))
        return out

    def problem(self, digests: dict[int, str], whole_sha256: str | None) -> str | None:
        """Why the file is not its published bytes (None: it is), from its spans' digests."""
        if self.algorithm is not None and self.target.checksum is not None:
            want = checksums.parse(self.target.checksum)[1]
            got = checksums.whole_file(
                self.algorithm,
                [digests[s.offset] for s in self.spans],
                [s.length for s in self.spans],
                self.parted,
            )
            if got != want:
                return f"its {self.algorithm} is {got}, the server published {want}"
        if self.sha256 is not None and whole_sha256 != self.sha256:
            return f"its sha256 is {whole_sha256}, the uploader declared {self.sha256}"
        return None


def plan(target: DownloadTarget, range_size: int = RANGE_SIZE) -> FilePlan:
    size = target.size
    algorithm: str | None = None
    parted = False
    if target.checksum is not None:
        algorithm = checksums.parse(target.checksum)[0]
    if algorithm is not None and target.part_size is not None:
        lengths = checksums.range_lengths(size, target.part_size)
        parted = True
    elif algorithm == checksums.CRC64NVME and size > range_size:
        lengths = checksums.range_lengths(size, range_size)
        parted = True  # a CRC combined over any split is the CRC of the whole
    else:
        lengths = [size]
    spans, offset = [], 0
    for length in lengths:
        spans.append(Span(offset, length))
        offset += length
    sha256 = target.sha256.lower() if target.sha256 else None
    if sha256 is not None and target.checksum == f"sha256:{sha256}":
        sha256 = None  # the checksum is that very digest
    return FilePlan(target, algorithm, parted, spans, sha256)
