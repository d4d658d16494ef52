"""schemathesis against the served OpenAPI document: no 500s, no unauthenticated 2xx, and every
answer matches the schema. Examples per operation are bounded so the whole file stays fast."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from methodic.server import EmbeddedServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=20,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run
    database=None,
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(Path(tmp_path_factory.mktemp("fuzz"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server: EmbeddedServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@FUZZ
def test_authenticated_requests_never_fail_the_server_or_the_schema(
    case: Case, fuzz_server: EmbeddedServer
) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers={"Authorization": f"Bearer {fuzz_server.api_key}"},
        checks=CHECKS,
    )


@schema.parametrize()
@FUZZ
def test_unauthenticated_requests_are_refused(case: Case, fuzz_server: EmbeddedServer) -> None:
    for headers in ({}, {"Authorization": "Bearer sk_agent_not-the-key-000000000"}):
        response = case.call(base_url=fuzz_server.url, headers=headers)
        if case.path == "/healthz":  # open by design (405 for another method)
            assert response.status_code == (200 if case.method == "GET" else 405)
            continue
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code)
        case.validate_response(response, checks=CHECKS)
