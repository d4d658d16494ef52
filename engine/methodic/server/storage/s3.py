"""The S3 storage backend: clients PUT straight to a bucket; this server keeps only metadata.

Objects are named ``PREFIX/ASSET_ID/NNNNNNN`` by manifest position (the metadata database maps
them to paths), so any valid component path fits S3's 1024-byte key limit. A one-PUT component
gets a SigV4-presigned ``PutObject`` URL, a part a presigned ``UploadPart`` URL; both sign the
``Content-Length``. A component's multipart upload is created on the first presign of one of its
parts, its UploadId kept in the metadata database, and completed at finalize from the parts S3
lists (never from ETags a client reports). What is stored is always asked of S3 itself
(ListObjectsV2, ListParts), so recovery resends only what S3 lacks.

Checksums: S3 verifies them itself. A target presigned with the range's digest signs the
``x-amz-checksum-crc64nvme`` (or ``-sha256``) header into the URL, so S3 refuses a body with
another checksum and the URL cannot be replayed with another header. Multipart uploads are
created with the asset's algorithm (CRC64NVME as a FULL_OBJECT checksum, SHA256 COMPOSITE);
CompleteMultipartUpload carries the client's full-object CRC (or the parts' SHA256s), and the
completed object's checksum is read back with HeadObject and compared with the client's
whenever the store reports one. So is a one-PUT object's, unless every URL presigned for it
was bound to the client's checksum (kept in ``s3_put_bindings`` before the URLs leave): S3
verified that one on PUT, and the listing gave the size. blake3 is not an S3 algorithm.

boto3 is imported only here, and only when a server is started with ``--storage s3://``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from methodic import _checksum
from methodic.server.config import S3Location
from methodic.server.db import Database
from methodic.server.locks import KeyedLocks
from methodic.server.storage.base import (
    BlobKey,
    Component,
    Found,
    Presigned,
    Slot,
    StorageLimits,
    StorageSetupError,
    StorageUnavailable,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
T = TypeVar("T")
# The asset algorithms S3 verifies: boto3's parameter and header names, and the checksum type
# of a multipart upload's object.
_S3_CHECKSUM = {
    _checksum.CRC64NVME: ("ChecksumCRC64NVME", "x-amz-checksum-crc64nvme", "FULL_OBJECT"),
    _checksum.SHA256: ("ChecksumSHA256", "x-amz-checksum-sha256", "COMPOSITE"),
}


def open_s3_storage(
    location: S3Location, db: Database, *, endpoint_url: str | None, region: str | None
) -> S3Storage:
    """A client for ``location`` whose bucket answered; StorageSetupError (one line) otherwise."""
    try:
        import boto3  # type: ignore[import-untyped]  # boto3 ships no type information
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:
        raise StorageSetupError("--storage s3:// needs boto3: pip install 'methodic[s3]'") from None
    config = Config(
        signature_version="s3v4",
        # S3-compatible services (MinIO, Ceph RGW) are addressed by path, AWS by virtual host.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=32,
    )
    try:
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    except Exception as exc:  # botocore raises many types for a bad configuration
        raise StorageSetupError(f"cannot set up the S3 client: {exc}") from None
    # botocore's DEBUG lines show canonical requests, session token included: never let a
    # server-wide DEBUG level reach them (a level set on these loggers on purpose is kept).
    for name in ("botocore", "boto3", "urllib3"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
    storage = S3Storage(
        client, location, db, endpoint_url=endpoint_url, credentials=session.get_credentials()
    )
    storage.check_bucket()
    return storage


def _setup_error(exc: Exception, location: S3Location, endpoint: str) -> StorageSetupError:
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket = location.bucket
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageSetupError(
            "no AWS credentials found for the S3 storage: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where a role provides them"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageSetupError(f"cannot reach the S3 endpoint {endpoint}: {exc}")
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 or code in ("404", "NoSuchBucket"):
            return StorageSetupError(
                f"S3 bucket {bucket!r} does not exist at {endpoint}; create it first"
            )
        if status in (301, 307) or code in ("301", "PermanentRedirect"):
            region = (
                exc.response.get("ResponseMetadata", {})
                .get("HTTPHeaders", {})
                .get("x-amz-bucket-region", "its region")
            )
            return StorageSetupError(
                f"S3 bucket {bucket!r} is in another region: pass --s3-region {region}"
            )
        if status == 403 or code in (
            "403",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ):
            return StorageSetupError(
                f"access to S3 bucket {bucket!r} was denied ({code}): check the credentials and "
                "that they may list, read and write the bucket"
            )
        return StorageSetupError(f"S3 bucket {bucket!r} at {endpoint} answered {code or status}")
    return StorageSetupError(f"cannot use S3 bucket {bucket!r} at {endpoint}: {exc}")


class S3Storage:
    limits = StorageLimits(
        min_part_size=5 * MiB,
        max_part_size=5 * GiB,
        max_single_put=5 * GiB,
        checksum_algorithms=tuple(_S3_CHECKSUM),
    )
    receiver = None

    def __init__(
        self,
        client: Any,
        location: S3Location,
        db: Database,
        *,
        endpoint_url: str | None,
        credentials: Any,
    ) -> None:
        self._s3 = client
        self._credentials = credentials  # the client's (botocore Credentials), for presigning
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.location = location
        self._db = db
        self._endpoint = endpoint_url or "AWS"
        self._creating = KeyedLocks()

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    def describe(self) -> str:
        return f"{self.location} at {self._endpoint}"

    def close(self) -> None:
        self._s3.close()

    def check_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _setup_error(exc, self.location, self._endpoint) from None

    # ---- naming ----------------------------------------------------------------------------

    def _asset_prefix(self, asset_id: str) -> str:
        return f"{self.prefix}{asset_id}/"

    def _object(self, key: BlobKey) -> str:
        return f"{self._asset_prefix(key.asset_id)}{key.index:07d}"

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run one S3 call; a failure becomes StorageUnavailable (the client retries)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise StorageUnavailable(f"S3 {what} failed ({code})") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {what} failed ({type(exc).__name__})") from exc

    @staticmethod
    def _no_such_upload(exc: StorageUnavailable) -> bool:
        cause = exc.__cause__
        code: object = getattr(cause, "response", {}).get("Error", {}).get("Code")
        return code == "NoSuchUpload"

    # ---- multipart upload ids (in the metadata database) -----------------------------------

    def _upload_ids(self, asset_id: str) -> dict[int, str]:
        return {idx: upload_id for idx, (upload_id, _) in self._uploads(asset_id).items()}

    def _uploads(self, asset_id: str) -> dict[int, tuple[str, str | None]]:
        """{component index: (UploadId, the checksum algorithm it was created with)}."""
        rows = self._db.connection().execute(
            "SELECT idx, upload_id, checksum_algorithm FROM multipart_uploads WHERE asset_id = ?",
            (asset_id,),
        )
        return {idx: (upload_id, algorithm) for idx, upload_id, algorithm in rows}

    def _drop_upload_id(self, asset_id: str, index: int) -> None:
        with self._db.write() as tx:
            tx.execute(
                "DELETE FROM multipart_uploads WHERE asset_id = ? AND idx = ?", (asset_id, index)
            )

    def _create_upload(self, key: BlobKey, algorithm: str | None) -> str:
        """The component's multipart upload, created now if it has none (once, under a lock).

        ``algorithm``: the asset's checksum algorithm (None: a legacy asset's upload, created
        without one). Parts presigned unbound may still be sent to it.
        """
        with self._creating.hold((key.asset_id, key.index)):
            existing = self._upload_ids(key.asset_id).get(key.index)
            if existing is not None:
                return existing
            extra: dict[str, str] = {}
            if algorithm is not None:
                extra = {
                    "ChecksumAlgorithm": algorithm.upper(),
                    "ChecksumType": _S3_CHECKSUM[algorithm][2],
                }
            created = self._call(
                "CreateMultipartUpload",
                self._s3.create_multipart_upload,
                Bucket=self.bucket,
                Key=self._object(key),
                **extra,
            )
            upload_id: str = created["UploadId"]
            try:
                with self._db.write(durable=True) as tx:
                    tx.execute(
                        "INSERT INTO multipart_uploads"
                        " (asset_id, idx, upload_id, created_at, checksum_algorithm)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (key.asset_id, key.index, upload_id, time.time(), algorithm),
                    )
            except Exception:
                # The asset went away meanwhile (its component row is gone): leave nothing in S3.
                self._abort(self._object(key), upload_id)
                raise
            return upload_id

    def _abort(self, object_key: str, upload_id: str) -> None:
        try:
            self._call(
                "AbortMultipartUpload",
                self._s3.abort_multipart_upload,
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
            )
        except StorageUnavailable as exc:
            if not self._no_such_upload(exc):
                raise

    # ---- presigning ------------------------------------------------------------------------

    def presign_puts(
        self, asset_id: str, slots: Sequence[Slot], expires: int, origin: str
    ) -> list[Presigned]:
        """SigV4 query-signed PUT URLs, by the signer botocore presigns with (its
        ``s3v4-query`` auth: ``S3SigV4QueryAuth``, or awscrt's when that is installed).

        ``generate_presigned_url`` costs milliseconds a URL (request serialization, endpoint
        rules, event hooks), most of a small file's cost on the server. The URL of an object of
        the asset differs from another's only in its name's last segment (digits), so botocore
        chooses the address and the credential scope once a batch, and each slot's request is
        only signed: the same URL, headers signed alike.
        """
        from botocore.auth import (  # type: ignore[import-untyped]
            AUTH_TYPE_MAPS,
            _host_from_url,
        )
        from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

        if not slots:
            return []
        ttl = max(1, expires - int(time.time()))
        # The last segment of any object name is its index, in digits (quoted as itself).
        last = f"{0:07d}"
        sample = urlsplit(
            self._s3.generate_presigned_url(
                "put_object",
                Params={"Bucket": self.bucket, "Key": self._asset_prefix(asset_id) + last},
                ExpiresIn=ttl,
            )
        )
        scope = parse_qs(sample.query)["X-Amz-Credential"][0].split("/")
        region, service = scope[-3], scope[-2]
        assert sample.path.endswith(last), sample.path
        base = f"{sample.scheme}://{sample.netloc}{sample.path[: -len(last)]}"
        self._bind(asset_id, [s for s in slots if s.part is None])
        credentials = self._credentials.get_frozen_credentials()
        signer = AUTH_TYPE_MAPS["s3v4-query"](credentials, service, region, ttl)
        # The signer derives the Host header from each URL unless it has one: one a batch.
        host = _host_from_url(base)
        uploads: dict[int, str] | None = None
        out: list[Presigned] = []
        for slot in slots:
            key = slot.component.key(asset_id)
            signed = {"host": host, "Content-Length": str(slot.length)}
            headers: dict[str, str] = {}
            if slot.checksum is not None:
                algorithm, _, digest = slot.checksum.partition(":")
                header = _S3_CHECKSUM[algorithm][1]
                signed[header] = headers[header] = _checksum.to_base64(digest)
            request = AWSRequest("PUT", f"{base}{key.index:07d}", headers=signed)
            if slot.part is not None:
                if uploads is None:
                    uploads = self._upload_ids(asset_id)
                if key.index not in uploads:
                    kind = slot.component.algorithm
                    uploads[key.index] = self._create_upload(
                        key, kind if kind in _S3_CHECKSUM else None
                    )
                request.params = {"uploadId": uploads[key.index], "partNumber": str(slot.part)}
            signer.add_auth(request)
            out.append(Presigned(request.url, headers))
        return out

    def _bind(self, asset_id: str, slots: Sequence[Slot]) -> None:
        """Record what the one-PUT URLs about to be issued are bound to (before they leave, and
        durably: a URL whose binding a crash forgot must not let finalize skip its check)."""
        if not slots:
            return
        with self._db.write(durable=True) as tx:
            tx.executemany(
                "INSERT INTO s3_put_bindings (asset_id, idx, checksum) VALUES (?, ?, ?)"
                " ON CONFLICT (asset_id, idx) DO UPDATE SET checksum = ''"
                " WHERE s3_put_bindings.checksum != excluded.checksum",
                [(asset_id, s.component.index, s.checksum or "") for s in slots],
            )

    def _bindings(self, asset_id: str) -> dict[int, str]:
        rows = self._db.connection().execute(
            "SELECT idx, checksum FROM s3_put_bindings WHERE asset_id = ?", (asset_id,)
        )
        return dict(rows.fetchall())

    def presign_get(self, key: BlobKey, expires: int, origin: str) -> str:
        ttl = max(1, expires - int(time.time()))
        url: str = self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=ttl
        )
        return url

    # ---- what S3 holds ---------------------------------------------------------------------

    def _paginate(self, operation: str, what: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        pages = iter(self._s3.get_paginator(operation).paginate(**kwargs))
        while (page := self._call(what, lambda: next(pages, None))) is not None:
            yield page

    def _listing(self, asset_id: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under the asset's prefix."""
        for page in self._paginate(
            "list_objects_v2",
            "ListObjectsV2",
            Bucket=self.bucket,
            Prefix=self._asset_prefix(asset_id),
        ):
            for item in page.get("Contents", ()):
                yield item["Key"], int(item["Size"])

    def _objects(self, asset_id: str) -> dict[int, int]:
        """{component index: object size} of the asset's objects."""
        skip = len(self._asset_prefix(asset_id))
        return {
            int(key[skip:]): size for key, size in self._listing(asset_id) if key[skip:].isdigit()
        }

    def _parts(self, key: BlobKey, upload_id: str) -> dict[int, dict[str, Any]] | None:
        """{part number: ListParts' entry} of an upload; None when S3 no longer has the upload."""
        out: dict[int, dict[str, Any]] = {}
        try:
            for page in self._paginate(
                "list_parts",
                "ListParts",
                Bucket=self.bucket,
                Key=self._object(key),
                UploadId=upload_id,
            ):
                for part in page.get("Parts", ()):
                    out[int(part["PartNumber"])] = part
        except StorageUnavailable as exc:
            if self._no_such_upload(exc):
                return None
            raise
        return out

    def _good_parts(
        self, c: Component, parts: dict[int, dict[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """{part: entry} of the parts whose size is the layout's (others must be sent again)."""
        return {
            n: part
            for n, part in parts.items()
            if 1 <= n <= c.parts and int(part["Size"]) == c.part_length(n)
        }

    def inspect(
        self, asset_id: str, components: Sequence[Component], *, deep: bool, workers: int
    ) -> list[Found]:
        objects = self._objects(asset_id) if components else {}
        uploads = self._upload_ids(asset_id)
        pending = [
            c
            for c in components
            if c.part_size is not None and objects.get(c.index) != c.size and c.index in uploads
        ]

        def list_parts(c: Component) -> dict[int, dict[str, Any]]:
            parts = self._parts(c.key(asset_id), uploads[c.index])
            if parts is None:  # aborted behind our back: the next presign starts a new upload
                self._drop_upload_id(asset_id, c.index)
                return {}
            return self._good_parts(c, parts)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pending)))) as pool:
            listed = dict(
                zip((c.index for c in pending), pool.map(list_parts, pending), strict=True)
            )
        found: list[Found] = []
        for c in components:
            size = objects.get(c.index)
            if c.part_size is None:
                if size is None or (size != c.size and not deep):
                    found.append(Found(False))
                else:
                    found.append(Found(True, size=size))
            elif size == c.size:
                found.append(Found(True, size=size))  # assembled by an earlier finalize
            else:
                parts = frozenset(listed.get(c.index, {}))
                complete = len(parts) == c.parts
                found.append(Found(complete, parts, size=c.size if complete else None))
        return found

    # ---- finalize, forget, delete ----------------------------------------------------------

    def seal(
        self,
        asset_id: str,
        components: Sequence[Component],
        workers: int,
        checksums: Mapping[int, str],
    ) -> list[tuple[Component, str]]:
        uploads = self._uploads(asset_id)
        multipart = {c.index for c in components if c.part_size is not None and c.index in uploads}
        todo = [
            c
            for c in components
            if c.index in multipart or (c.algorithm is not None and c.index in checksums)
        ]

        def complete(c: Component) -> str | None:
            key = c.key(asset_id)
            upload_id, upload_algorithm = uploads[c.index]
            client = checksums.get(c.index)
            for _attempt in range(2):  # once more if a part was replaced while we listed
                parts = self._parts(key, upload_id)
                if parts is None:
                    break  # completed by an earlier finalize that did not commit
                good = self._good_parts(c, parts)
                if len(good) != c.parts:
                    return "not stored"
                extra: dict[str, Any] = {}
                listed: list[dict[str, Any]] = []
                param = _S3_CHECKSUM[upload_algorithm][0] if upload_algorithm else None
                for n in sorted(good):
                    item = {"PartNumber": n, "ETag": good[n]["ETag"]}
                    if param is not None and good[n].get(param):
                        item[param] = good[n][param]
                    listed.append(item)
                listed_whole = None
                if upload_algorithm is not None and upload_algorithm == c.algorithm:
                    listed_whole = _listed_whole(c, upload_algorithm, good)
                if client is not None and listed_whole is not None and listed_whole != client:
                    return (
                        f"checksum mismatch: stored {upload_algorithm}:{listed_whole}, "
                        f"the client computed {upload_algorithm}:{client}"
                    )
                if upload_algorithm == _checksum.CRC64NVME:
                    whole = client or listed_whole
                    if whole is not None:
                        extra = {
                            "ChecksumCRC64NVME": _checksum.to_base64(whole),
                            "ChecksumType": "FULL_OBJECT",
                        }
                try:
                    self._call(
                        "CompleteMultipartUpload",
                        self._s3.complete_multipart_upload,
                        Bucket=self.bucket,
                        Key=self._object(key),
                        UploadId=upload_id,
                        MultipartUpload={"Parts": listed},
                        **extra,
                    )
                    break
                except StorageUnavailable as exc:
                    code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
                    if code in ("BadDigest", "InvalidDigest"):
                        return (
                            f"checksum mismatch: the store refused the client's checksum "
                            f"{c.receipt_algorithm}:{client} ({code})"
                        )
                    if code not in ("InvalidPart", "NoSuchUpload") or _attempt:
                        raise
            problem = self._check_object(asset_id, c, client)
            if problem is None:
                self._drop_upload_id(asset_id, c.index)
            return problem

        bindings = self._bindings(asset_id)

        def check(c: Component) -> str | None:
            if c.index in multipart:
                return complete(c)
            if bindings.get(c.index) == f"{c.algorithm}:{checksums[c.index]}":
                # Every URL of it was bound to the client's checksum, which S3 verified on PUT
                # (and inspect listed its size): nothing for HeadObject to add.
                return None
            return self._check_object(asset_id, c, checksums[c.index])

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            results = list(pool.map(check, todo))
        problems = [(c, why) for c, why in zip(todo, results, strict=True) if why]
        if not problems:
            # Strays: uploads created by a crash before their id was kept. Only those of these
            # components: a multi-rank asset seals one rank's while others still upload theirs.
            self._abort_all(asset_id, {self._object(c.key(asset_id)) for c in components})
        return problems

    def _check_object(self, asset_id: str, c: Component, client: str | None) -> str | None:
        """Why the stored object is not the component (size, or the checksum the store reports
        differs from the client's), or None."""
        head = self._head(c.key(asset_id), checksum_mode=client is not None)
        if head is None:
            return "not stored"
        if int(head["ContentLength"]) != c.size:
            return (
                f"size mismatch: stored {head['ContentLength']} bytes, the manifest says {c.size}"
            )
        algorithm = c.algorithm
        if client is None or algorithm not in _S3_CHECKSUM:
            return None
        reported = head.get(_S3_CHECKSUM[algorithm][0])
        if not reported:
            return None  # the store keeps none of this algorithm: what it verified on PUT stands
        stored = _checksum.from_base64(str(reported))
        if ("-" in stored) != ("-" in client):
            return None  # a full-object value against a composite one: not comparable
        if stored != client:
            return (
                f"checksum mismatch: stored {algorithm}:{stored}, "
                f"the client computed {algorithm}:{client}"
            )
        return None

    def _head(self, key: BlobKey, *, checksum_mode: bool = False) -> dict[str, Any] | None:
        extra = {"ChecksumMode": "ENABLED"} if checksum_mode else {}
        try:
            head: dict[str, Any] = self._call(
                "HeadObject",
                self._s3.head_object,
                Bucket=self.bucket,
                Key=self._object(key),
                **extra,
            )
        except StorageUnavailable as exc:
            status = (
                getattr(exc.__cause__, "response", {})
                .get("ResponseMetadata", {})
                .get("HTTPStatusCode")
            )
            if status == 404:
                return None
            raise
        return head

    def forget(self, key: BlobKey) -> None:
        upload_id = self._upload_ids(key.asset_id).get(key.index)
        if upload_id is not None:
            self._abort(self._object(key), upload_id)
            self._drop_upload_id(key.asset_id, key.index)
        self._call(
            "DeleteObject", self._s3.delete_object, Bucket=self.bucket, Key=self._object(key)
        )

    def _abort_all(self, asset_id: str, only: set[str] | None = None) -> None:
        """Abort the asset's multipart uploads in progress (``only``: of these object keys)."""
        pages = self._paginate(
            "list_multipart_uploads",
            "ListMultipartUploads",
            Bucket=self.bucket,
            Prefix=self._asset_prefix(asset_id),
        )
        try:
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if only is None or upload["Key"] in only:
                        self._abort(upload["Key"], upload["UploadId"])
        except StorageUnavailable as exc:
            if not self._no_such_upload(exc):  # rclone's answer when the prefix has none
                raise

    def delete_asset(self, asset_id: str) -> None:
        self._abort_all(asset_id)
        keys = [{"Key": key} for key, _size in self._listing(asset_id)]
        for start in range(0, len(keys), 1000):
            self._call(
                "DeleteObjects",
                self._s3.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": keys[start : start + 1000], "Quiet": True},
            )


def _listed_whole(
    c: Component, algorithm: str, parts: Mapping[int, Mapping[str, Any]]
) -> str | None:
    """The whole-file checksum value from the checksums S3 listed for the parts (the combined
    CRC64NVME, or the composite SHA256); None when a part has none listed."""
    param = _S3_CHECKSUM[algorithm][0]
    values = [parts[n].get(param) for n in sorted(parts)]
    if not values or not all(values):
        return None
    digests = [_checksum.from_base64(str(v)) for v in values]
    lengths = [c.part_length(n) for n in sorted(parts)]
    return _checksum.whole_file(algorithm, digests, lengths, parted=True)
