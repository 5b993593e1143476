"""`tandem gateway conformance URL` passes the project's own gateway, and catches one that strays."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tandem.protocols.conformance import FAIL, PASS, SKIP, run_conformance
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import KeyRing, Principal, hash_key
from tandem.remote_gateway.service import Gateway
from tandem.sdk.cli import app

from .conftest import serve_in_thread

KEY = "conformance-test-key"


def test_the_gateway_conforms(words_server):
    report = run_conformance(words_server)
    failed = [(c.name, c.detail) for c in report.checks if c.result == FAIL]
    assert report.passed, failed
    by_name = {c.name: c for c in report.checks}
    assert by_name["auth is required"].result == SKIP  # no keys on this one
    assert by_name["a right draft is accepted, plus a bonus token"].result == PASS
    assert by_name["verify_text in a text session"].result == PASS
    assert sum(c.result == PASS for c in report.checks) >= 20


def test_the_command_prints_a_table_and_exits_0(tiny_server):
    result = CliRunner().invoke(app, ["gateway", "conformance", tiny_server])
    assert result.exit_code == 0, result.output
    assert "a stale position is 409" in result.output and "0 failed" in result.output
    result = CliRunner().invoke(app, ["gateway", "conformance", tiny_server, "--json"])
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["fail"] == 0 and len(report["checks"]) == report["pass"] + report["skip"]


@pytest.fixture()
def keyed_server(tiny_target):
    gw = Gateway(tiny_target)
    with serve_in_thread(create_app(gw, KeyRing({hash_key(KEY): Principal("tester")}, required=True))) as url:
        yield url
    gw.close()


def test_a_keyed_gateway_conforms_with_its_key_and_not_without(keyed_server):
    report = run_conformance(keyed_server, api_key=KEY)
    assert report.passed, [(c.name, c.detail) for c in report.checks if c.result == FAIL]
    assert next(c for c in report.checks if c.name == "auth is required").result == PASS
    result = CliRunner().invoke(app, ["gateway", "conformance", keyed_server])
    assert result.exit_code == 1 and "HTTP 401" in result.output


class StrayStatuses:
    """ASGI middleware that answers every 409 as 400: a gateway that strays from the protocol."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        async def send_changed(message):
            if message["type"] == "http.response.start" and message["status"] == 409:
                message = {**message, "status": 400}
            await send(message)

        await self.inner(scope, receive, send_changed)


def test_a_stray_gateway_fails_and_the_command_exits_1(tiny_gateway):
    with serve_in_thread(StrayStatuses(create_app(tiny_gateway))) as url:
        report = run_conformance(url)
        result = CliRunner().invoke(app, ["gateway", "conformance", url])
    failed = {c.name: c.detail for c in report.checks if c.result == FAIL}
    assert set(failed) == {"a stale position is 409", "a tokenizer mismatch is 409"}
    assert "expected 409 wrong_position, got 400 wrong_position" in failed["a stale position is 409"]
    assert result.exit_code == 1 and "2 failed" in result.output


def test_an_unreachable_url_fails_every_check_it_can_run():
    report = run_conformance("http://127.0.0.1:9", timeout_s=2)
    assert not report.passed
    assert report.checks[0].result == FAIL and "no answer" in report.checks[0].detail
    assert all(c.result in (FAIL, SKIP) for c in report.checks)
