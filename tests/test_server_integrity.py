"""The integrity chain on the server, over real HTTP (docs/http-api.md, Checksums).

Every range a client sends is bound to the digest it computed (presign ``checksum``), the blob
listener refuses a body with another digest, and finalize compares the whole-file checksum the
client computed with the one the server derives from its receipts, without reading parted
files back while its receipts are trusted.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import connect, digest, ranges, whole

from methodic.server import EmbeddedServer, db
from methodic.server.signing import CHECKSUM_HEADER
from methodic.server.state import DB_FILE
from methodic.server.storage.local import LocalStorage

PART = 1000


def make_run(api: httpx.Client) -> str:
    experiment = api.post("/api/v1/experiments", json={"name": "integrity"}).json()
    return str(api.put(f"/api/v1/experiments/{experiment['id']}/runs/0/0").json()["id"])


def create(
    api: httpx.Client, components: list[dict[str, Any]], algorithm: str | None = None
) -> str:
    body: dict[str, Any] = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "checkpoint",
        "components": components,
    }
    if algorithm is not None:
        body["checksum_algorithm"] = algorithm
    response = api.post(f"/api/v1/runs/{make_run(api)}/assets", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["asset_id"])


def presign(
    api: httpx.Client, asset_id: str, path: str, part: int | None, checksum: str | None
) -> dict[str, Any]:
    item: dict[str, Any] = {"path": path, "part": part}
    if checksum is not None:
        item["checksum"] = checksum
    response = api.post(f"/api/v1/assets/{asset_id}/presign", json={"targets": [item]})
    assert response.status_code == 200, response.text
    return dict(response.json()["targets"][0])


def put(target: dict[str, Any], body: bytes, **headers: str) -> httpx.Response:
    sent = {**target["headers"], **headers}
    return httpx.put(target["url"], content=body, headers=sent, trust_env=False)


def send_all(
    api: httpx.Client, asset_id: str, path: str, data: bytes, part_size: int | None, algorithm: str
) -> None:
    """Every range of ``data``, each bound to its digest."""
    for part, offset, length in ranges(len(data), part_size):
        body = data[offset : offset + length]
        target = presign(api, asset_id, path, part, digest(algorithm, body))
        assert target["headers"] == {CHECKSUM_HEADER: f"{algorithm}:{digest(algorithm, body)}"}
        response = put(target, body)
        assert response.status_code == 201, response.text
        assert response.json()["bound"] is True


def components(api: httpx.Client, asset_id: str) -> dict[str, dict[str, Any]]:
    return {c["path"]: c for c in api.get(f"/api/v1/assets/{asset_id}").json()["components"]}


def local_storage(srv: EmbeddedServer) -> LocalStorage:
    assert srv._state is not None
    storage = srv._state.storage
    assert isinstance(storage, LocalStorage)
    return storage


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = dict(response.json()["error"])
    assert error["code"] == code
    return error


# ---- binding: the receiver refuses other bytes -----------------------------------------------


def test_a_bound_put_with_other_bytes_is_refused_and_nothing_is_stored(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    good, evil = b"the real weights", b"someone's others"
    asset_id = create(api, [{"path": "w.bin", "size": len(good)}])
    target = presign(api, asset_id, "w.bin", None, digest("crc64nvme", good))
    error = error_of(put(target, evil), 400, "checksum_mismatch")
    assert error["message"].startswith("checksum mismatch: ")
    assert "nothing was stored" in error["message"]
    assert components(api, asset_id)["w.bin"]["stored"] is False
    assert not any(p.is_file() for p in (server.data_dir / "blobs").rglob("*"))

    assert put(target, good).status_code == 201  # the same URL takes the right bytes
    assert components(api, asset_id)["w.bin"]["stored"] is True


def test_a_bound_part_with_other_bytes_is_refused_and_a_replay_destroys_nothing(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    data = os.urandom(2500)
    asset_id = create(api, [{"path": "p", "size": len(data), "part_size": PART}])
    part2 = data[PART : 2 * PART]
    target = presign(api, asset_id, "p", 2, digest("crc64nvme", part2))
    error_of(put(target, os.urandom(PART)), 400, "checksum_mismatch")
    assert components(api, asset_id)["p"]["parts_stored"] == []

    assert put(target, part2).status_code == 201
    assert components(api, asset_id)["p"]["parts_stored"] == [2]
    # A leaked part URL replayed with other bytes once the part is stored: refused, and its
    # body is only checked, never written, so the stored part stays.
    error_of(put(target, os.urandom(PART)), 400, "checksum_mismatch")
    assert put(target, part2).status_code == 201  # the same bytes again: fine, nothing written
    assert components(api, asset_id)["p"]["parts_stored"] == [2]
    for n in (1, 3):
        body = data[(n - 1) * PART : n * PART]
        assert (
            put(presign(api, asset_id, "p", n, digest("crc64nvme", body)), body).status_code == 201
        )
    checksums = {"p": whole("crc64nvme", data, PART)}
    done = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
    assert done.status_code == 200, done.text
    # Read back once: the first refused body was written into the file before its digest was
    # known (the replay, checked against a receipt, wrote nothing).
    assert local_storage(server).bytes_read_back == len(data)
    url = api.get(f"/api/v1/assets/{asset_id}/download").json()["components"][0]["url"]
    assert httpx.get(url, trust_env=False).content == data


def test_a_bound_url_with_another_or_no_checksum_header_fails_its_signature(
    api: httpx.Client,
) -> None:
    good, evil = b"abc", b"xyz"
    asset_id = create(api, [{"path": "a", "size": 3}])
    target = presign(api, asset_id, "a", None, digest("crc64nvme", good))
    tampered = put(target, evil, **{CHECKSUM_HEADER: f"crc64nvme:{digest('crc64nvme', evil)}"})
    assert "signature" in error_of(tampered, 403, "forbidden")["message"]
    bare = httpx.put(target["url"], content=good, trust_env=False)  # the header left out
    error_of(bare, 403, "forbidden")
    assert components(api, asset_id)["a"]["stored"] is False
    assert put(target, good).status_code == 201


def test_a_presign_checksum_that_is_not_a_digest_of_the_assets_algorithm_is_400(
    api: httpx.Client,
) -> None:
    asset_id = create(api, [{"path": "a", "size": 3}], algorithm="sha256")
    url = f"/api/v1/assets/{asset_id}/presign"
    for bad in ("xyz", digest("crc64nvme", b"abc"), digest("sha256", b"abc").upper()):
        response = api.post(url, json={"targets": [{"path": "a", "checksum": bad}]})
        assert "sha256 digest" in error_of(response, 400, "invalid_request")["message"]


def test_the_algorithm_is_kept_from_the_first_create_and_reported(api: httpx.Client) -> None:
    run = make_run(api)
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "t",
        "components": [{"path": "a", "size": 1}],
    }
    first = api.post(f"/api/v1/runs/{run}/assets", json={**body, "checksum_algorithm": "blake3"})
    assert first.status_code == 201 and first.json()["checksum_algorithm"] == "blake3"
    again = api.post(f"/api/v1/runs/{run}/assets", json={**body, "checksum_algorithm": "sha256"})
    assert again.status_code == 200 and again.json()["checksum_algorithm"] == "blake3"
    default = api.post(
        f"/api/v1/runs/{run}/assets", json={**body, "asset_id": uuid.uuid4().hex}
    ).json()
    assert default["checksum_algorithm"] == "crc64nvme"
    assert default["components"][0]["checksum"] is None
    listed = api.get(f"/api/v1/runs/{run}/assets", params={"include_pending": True}).json()
    assert {a["checksum_algorithm"] for a in listed["assets"]} == {"blake3", "crc64nvme"}
    bad = api.post(f"/api/v1/runs/{run}/assets", json={**body, "checksum_algorithm": "md5"})
    assert bad.status_code == 422


# ---- finalize: whole-file checksums from the receipts -----------------------------------------


@pytest.mark.parametrize("algorithm", ["crc64nvme", "sha256", "blake3"])
def test_finalize_with_the_clients_checksums_settles_them(
    api: httpx.Client, algorithm: str
) -> None:
    files = {"one": (os.urandom(1234), None), "parted": (os.urandom(3 * PART + 17), PART)}
    asset_id = create(
        api,
        [{"path": p, "size": len(d), "part_size": s} for p, (d, s) in files.items()],
        algorithm=algorithm,
    )
    for path, (data, part_size) in files.items():
        send_all(api, asset_id, path, data, part_size, algorithm)
    checksums = {p: whole(algorithm, d, s) for p, (d, s) in files.items()}
    finalized = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
    assert finalized.status_code == 200, finalized.text
    assert {c["path"]: c["checksum"] for c in finalized.json()["components"]} == checksums
    assert components(api, asset_id)["parted"]["checksum"] == checksums["parted"]

    download = api.get(f"/api/v1/assets/{asset_id}/download").json()
    for c in download["components"]:
        data, part_size = files[c["path"]]
        assert (c["checksum"], c["part_size"]) == (checksums[c["path"]], part_size)
        body = httpx.get(c["url"], trust_env=False)
        assert body.content == data
        assert body.headers["etag"] == f'"{checksums[c["path"]].partition(":")[2]}"'
    again = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
    assert again.status_code == 200
    other = {"one": whole(algorithm, b"x" * 1234, None)}
    error_of(
        api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": other}), 409, "conflict"
    )


@pytest.mark.parametrize("part_size", [None, PART])
def test_a_wrong_client_checksum_is_409_and_the_component_is_sent_again(
    server: EmbeddedServer, api: httpx.Client, part_size: int | None
) -> None:
    data = os.urandom(2 * PART + 5)
    asset_id = create(api, [{"path": "w", "size": len(data), "part_size": part_size}])
    send_all(api, asset_id, "w", data, part_size, "crc64nvme")
    wrong = whole("crc64nvme", os.urandom(len(data)), part_size)
    response = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"w": wrong}})
    [missing] = error_of(response, 409, "asset_incomplete")["missing"]
    right = whole("crc64nvme", data, part_size)
    assert missing["reason"] == f"checksum mismatch: stored {right}, the client computed {wrong}"
    if part_size is not None:
        assert missing["parts_missing"] == [1, 2, 3]
    component = components(api, asset_id)["w"]
    assert (component["stored"], component["parts_stored"]) == (False, [])
    assert not any(p.is_file() for p in (server.data_dir / "blobs").rglob("*"))

    send_all(api, asset_id, "w", data, part_size, "crc64nvme")
    finalized = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": {"w": right}})
    assert finalized.status_code == 200, finalized.text


def test_finalize_checksums_are_checked_for_form(api: httpx.Client) -> None:
    asset_id = create(
        api,
        [{"path": "a", "size": 3}, {"path": "p", "size": 2 * PART, "part_size": PART}],
        "sha256",
    )
    url = f"/api/v1/assets/{asset_id}/finalize"
    sha = digest("sha256", b"abc")
    cases = {
        "a": [sha, f"crc64nvme:{digest('crc64nvme', b'abc')}", f"sha256:{sha}-1", "sha256:zz"],
        "p": [f"sha256:{sha}", f"sha256:{sha}-3"],
    }
    for path, values in cases.items():
        for value in values:
            response = api.post(url, json={"checksums": {path: value}})
            assert path in error_of(response, 400, "invalid_request")["message"], value


def test_parts_bound_and_unbound_without_a_client_checksum_are_not_verified(
    api: httpx.Client,
) -> None:
    data = os.urandom(2 * PART)
    asset_id = create(api, [{"path": "p", "size": len(data), "part_size": PART}])
    assert (
        put(
            presign(api, asset_id, "p", 1, digest("crc64nvme", data[:PART])), data[:PART]
        ).status_code
        == 201
    )
    assert put(presign(api, asset_id, "p", 2, None), data[PART:]).status_code == 201
    [missing] = error_of(api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "asset_incomplete")[
        "missing"
    ]
    assert missing["reason"].startswith("not verified") and missing["parts_missing"] == [2]
    assert components(api, asset_id)["p"]["parts_stored"] == [1]
    send_all(api, asset_id, "p", data, PART, "crc64nvme")
    done = api.post(f"/api/v1/assets/{asset_id}/finalize")  # every receipt bound: verified
    assert done.status_code == 200
    assert done.json()["components"][0]["checksum"] == whole("crc64nvme", data, PART)


def test_finalizing_a_parted_file_reads_nothing_back_until_a_restart(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    data = os.urandom(5 * PART + 3)
    parted = create(api, [{"path": "p", "size": len(data), "part_size": PART}])
    send_all(api, parted, "p", data, PART, "crc64nvme")
    checksums = {"p": whole("crc64nvme", data, PART)}
    storage = local_storage(server)
    done = api.post(f"/api/v1/assets/{parted}/finalize", json={"checksums": checksums})
    assert done.status_code == 200, done.text
    assert storage.bytes_read_back == 0

    # After a restart the receipts are not trusted: finalize reads the file back, recomputes
    # every part's digest, and still settles the same checksum.
    again = create(api, [{"path": "p", "size": len(data), "part_size": PART}])
    send_all(api, again, "p", data, PART, "crc64nvme")
    server.stop()
    server.start()
    with connect(server) as fresh:
        done = fresh.post(f"/api/v1/assets/{again}/finalize", json={"checksums": checksums})
        assert done.status_code == 200, done.text
        assert done.json()["components"][0]["checksum"] == checksums["p"]
    assert local_storage(server).bytes_read_back == len(data)


def test_after_a_restart_a_part_whose_bytes_changed_on_disk_is_sent_again(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    data = os.urandom(3 * PART)
    asset_id = create(api, [{"path": "p", "size": len(data), "part_size": PART}])
    send_all(api, asset_id, "p", data, PART, "crc64nvme")
    server.stop()
    [file] = [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file()]
    with open(file, "r+b") as f:  # the disk lost part 2's bytes
        f.seek(PART + 10)
        f.write(b"\0" * 10)
    server.start()
    checksums = {"p": whole("crc64nvme", data, PART)}
    with connect(server) as fresh:
        response = fresh.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
        [missing] = error_of(response, 409, "asset_incomplete")["missing"]
        assert missing["parts_missing"] == [2]
        send_all(fresh, asset_id, "p", data, PART, "crc64nvme")
        done = fresh.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
        assert done.status_code == 200, done.text


# ---- legacy assets (from before checksum algorithms) ------------------------------------------


def test_a_database_from_before_algorithms_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for script in db.MIGRATIONS[:2]:
        conn.executescript(script)
    conn.executescript(
        """
        INSERT INTO experiments VALUES ('e', 'x', 0);
        INSERT INTO runs VALUES ('r', 'e', 0, 0, 'running', 0, 0);
        INSERT INTO assets (id, run_id, asset_type, metadata, manifest_digest, state,
            component_count, total_size, created_at, touched_at)
            VALUES ('done', 'r', 't', '{}', 'd', 'finalized', 1, 3, 0, 0),
                   ('open', 'r', 't', '{}', 'd', 'pending', 1, 3, 0, 0);
        INSERT INTO components VALUES ('done', 0, 'a', 3, NULL, NULL, 'aa'),
                                      ('open', 0, 'a', 3, NULL, 2, NULL);
        INSERT INTO parts VALUES ('open', 0, 1, 2, 'bb');
        PRAGMA user_version = 2;
        """
    )
    conn.close()
    database = db.Database(path)
    try:
        c = database.connection()
        # An older server's URLs for a pending asset were not recorded: S3 is always asked.
        bindings = c.execute("SELECT asset_id, idx, checksum FROM s3_put_bindings").fetchall()
        assert [tuple(r) for r in bindings] == [("open", 0, "")]
        assets = c.execute("SELECT id, checksum_algorithm FROM assets ORDER BY id").fetchall()
        assert [tuple(r) for r in assets] == [
            ("done", None),
            ("open", None),
        ]
        rows = c.execute(
            "SELECT asset_id, stored_digest, stored_bound, checksum FROM components ORDER BY asset_id"
        ).fetchall()
        assert [tuple(r) for r in rows] == [("done", "aa", 0, "sha256:aa"), ("open", None, 0, None)]
        part = c.execute("SELECT digest, bound FROM parts").fetchone()
        assert tuple(part) == ("bb", 0)
    finally:
        database.close()


def test_a_legacy_asset_finalizes_with_bare_sha256_checksums(
    server: EmbeddedServer, api: httpx.Client
) -> None:
    data = os.urandom(2 * PART + 7)
    files = {"one": (data[:50], None), "parted": (data, PART)}
    asset_id = create(
        api,
        [{"path": p, "size": len(d), "part_size": s} for p, (d, s) in files.items()],
        algorithm="sha256",
    )
    for path, (body, part_size) in files.items():
        for part, offset, length in ranges(len(body), part_size):
            target = presign(api, asset_id, path, part, None)  # unbound, as an old client
            assert put(target, body[offset : offset + length]).status_code == 201
    server.stop()  # what an asset created before algorithms looks like: no algorithm
    conn = sqlite3.connect(server.data_dir / DB_FILE)
    with conn:
        conn.execute("UPDATE assets SET checksum_algorithm = NULL WHERE id = ?", (asset_id,))
    conn.close()
    server.start()
    checksums = {p: digest("sha256", d) for p, (d, _) in files.items()}  # bare, whole-file sha256
    with connect(server) as fresh:
        done = fresh.post(f"/api/v1/assets/{asset_id}/finalize", json={"checksums": checksums})
        assert done.status_code == 200, done.text
        assert done.json()["checksum_algorithm"] is None
        got = {c["path"]: (c["sha256"], c["checksum"]) for c in done.json()["components"]}
        assert got == {p: (v, f"sha256:{v}") for p, v in checksums.items()}
