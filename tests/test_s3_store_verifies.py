"""What the S3 store itself guarantees, on LocalStack's S3 (moto verifies no checksum): a
presigned PUT that binds an x-amz-checksum-crc64nvme header stores the bytes with that CRC or
nothing, for PutObject and for UploadPart; CompleteMultipartUpload checks a FULL_OBJECT CRC
against the parts; and the header value is signed, so it cannot be swapped for another's.

These are the properties the engine's S3 backend relies on when it presigns a range's digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from awscrt import checksums
from botocore.exceptions import ClientError
from localstack import localstack_s3, new_versioned_bucket, s3_client

from methodic._checksum import CRC64NVME, to_base64, whole_file

HEADER = "x-amz-checksum-crc64nvme"
MIB = 1 << 20


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """One LocalStack for this module (per xdist worker that runs some of its tests)."""
    with localstack_s3() as url:
        yield url


@pytest.fixture
def s3(endpoint: str) -> Any:
    return s3_client(endpoint)


@pytest.fixture
def bucket(endpoint: str) -> str:
    return new_versioned_bucket(endpoint)


def data(size: int, seed: str) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def crc_hex(body: bytes) -> str:
    return f"{checksums.crc64nvme(body):016x}"


def crc_b64(body: bytes) -> str:
    """S3's x-amz-checksum-crc64nvme: base64 of the CRC's 8 big-endian bytes."""
    return to_base64(crc_hex(body))


def put(url: str, body: bytes, checksum: str) -> httpx.Response:
    return httpx.put(url, content=body, headers={HEADER: checksum}, timeout=60, trust_env=False)


def error_code(response: httpx.Response) -> str:
    return response.text.partition("<Code>")[2].partition("</Code>")[0]


def assert_signed(url: str) -> None:
    signed = parse_qs(urlsplit(url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert HEADER in signed and "content-length" in signed, signed


def presign_put_object(s3: Any, bucket: str, key: str, body: bytes) -> str:
    url: str = s3.generate_presigned_url(
        "put_object",
        Params={
            "Bucket": bucket,
            "Key": key,
            "ContentLength": len(body),
            "ChecksumCRC64NVME": crc_b64(body),
        },
        ExpiresIn=300,
    )
    assert_signed(url)
    return url


def presign_upload_part(
    s3: Any, bucket: str, key: str, upload_id: str, number: int, body: bytes
) -> str:
    url: str = s3.generate_presigned_url(
        "upload_part",
        Params={
            "Bucket": bucket,
            "Key": key,
            "UploadId": upload_id,
            "PartNumber": number,
            "ContentLength": len(body),
            "ChecksumCRC64NVME": crc_b64(body),
        },
        ExpiresIn=300,
    )
    assert_signed(url)
    return url


def stored(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404, exc.response
        return False
    return True


def new_upload(s3: Any, bucket: str, key: str) -> str:
    out = s3.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )
    assert (out.get("ChecksumAlgorithm"), out.get("ChecksumType")) == ("CRC64NVME", "FULL_OBJECT")
    return str(out["UploadId"])


def part_numbers(s3: Any, bucket: str, key: str, upload_id: str) -> list[int]:
    parts = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id).get("Parts", [])
    return [p["PartNumber"] for p in parts]


# ---- (a) PutObject ----------------------------------------------------------------------------


def test_put_object_refuses_other_bytes_and_keeps_the_right_ones(s3: Any, bucket: str) -> None:
    body, other = data(MIB + 3, "right"), data(MIB + 3, "other")
    url = presign_put_object(s3, bucket, "ckpt/model.bin", body)

    refused = put(url, other, crc_b64(body))
    assert (refused.status_code, error_code(refused)) == (400, "BadDigest"), refused.text
    assert not stored(s3, bucket, "ckpt/model.bin")

    accepted = put(url, body, crc_b64(body))
    assert accepted.status_code == 200, accepted.text
    assert accepted.headers[HEADER] == crc_b64(body)
    head = s3.head_object(Bucket=bucket, Key="ckpt/model.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc_b64(body)
    assert head["ContentLength"] == len(body)
    got = s3.get_object(Bucket=bucket, Key="ckpt/model.bin")["Body"].read()
    assert got == body


# ---- (b) UploadPart and CompleteMultipartUpload -----------------------------------------------


def test_upload_part_refuses_other_bytes_and_complete_checks_the_full_object_crc(
    s3: Any, bucket: str
) -> None:
    key = "ckpt/shard.bin"
    bodies = [data(5 * MIB, "part 1"), data(MIB + 7, "part 2")]
    whole = b"".join(bodies)
    upload_id = new_upload(s3, bucket, key)
    urls = [
        presign_upload_part(s3, bucket, key, upload_id, n, body) for n, body in enumerate(bodies, 1)
    ]

    refused = put(urls[0], data(5 * MIB, "other"), crc_b64(bodies[0]))
    assert (refused.status_code, error_code(refused)) == (400, "BadDigest"), refused.text
    assert part_numbers(s3, bucket, key, upload_id) == []

    parts = []
    for n, (url, body) in enumerate(zip(urls, bodies, strict=True), 1):
        r = put(url, body, crc_b64(body))
        assert r.status_code == 200, r.text
        assert r.headers[HEADER] == crc_b64(body)
        parts.append(
            {"PartNumber": n, "ETag": r.headers["etag"], "ChecksumCRC64NVME": crc_b64(body)}
        )
    assert part_numbers(s3, bucket, key, upload_id) == [1, 2]

    # The engine's whole-file checksum from the parts' digests is S3's FULL_OBJECT CRC.
    full = whole_file(CRC64NVME, [crc_hex(b) for b in bodies], [len(b) for b in bodies], True)
    assert full == crc_hex(whole)

    with pytest.raises(ClientError) as refused_complete:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            ChecksumCRC64NVME=crc_b64(whole[:-1]),
            ChecksumType="FULL_OBJECT",
        )
    assert refused_complete.value.response["Error"]["Code"] == "BadDigest"
    assert not stored(s3, bucket, key)

    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
        ChecksumCRC64NVME=to_base64(full),
        ChecksumType="FULL_OBJECT",
    )
    assert done["ChecksumCRC64NVME"] == to_base64(full)
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert (head["ChecksumCRC64NVME"], head["ChecksumType"]) == (crc_b64(whole), "FULL_OBJECT")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == whole


# ---- (c) the checksum header is signed ----------------------------------------------------------


@pytest.mark.parametrize("operation", ["put_object", "upload_part"])
def test_swapping_the_checksum_header_breaks_the_signature(
    s3: Any, bucket: str, operation: str
) -> None:
    key = f"ckpt/{operation}.bin"
    body, other = data(64 * 1024, "right"), data(64 * 1024, "other")
    if operation == "put_object":
        url = presign_put_object(s3, bucket, key, body)
    else:
        upload_id = new_upload(s3, bucket, key)
        url = presign_upload_part(s3, bucket, key, upload_id, 1, body)

    swapped = put(url, other, crc_b64(other))  # bytes and their own, true, checksum
    assert swapped.status_code == 403, swapped.text
    assert error_code(swapped) == "SignatureDoesNotMatch", swapped.text

    if operation == "put_object":
        assert not stored(s3, bucket, key)
    else:
        assert part_numbers(s3, bucket, key, upload_id) == []
    assert put(url, body, crc_b64(body)).status_code == 200  # the URL itself is good
