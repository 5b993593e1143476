"""API keys over a real loopback server: no key -> 401, another key's session -> 404, keys from
the config (hashed or from the environment), and the SDK with api_key= end to end."""

import httpx
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import AuthenticationError, UnknownSessionError
from tandem.protocols.http import HttpTransport
from tandem.protocols.messages import AppendRequest, OpenSession, VerifyRequest
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import KeyRing, Principal, hash_key, new_key
from tandem.remote_gateway.config import GatewayConfig, KeyConfig
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import run, serve_in_thread

ALICE, BOB = new_key(), new_key()


@pytest.fixture(scope="module")
def keyed(tiny_target):
    gw = Gateway(tiny_target)
    keys = KeyRing({hash_key(ALICE): Principal("alice"), hash_key(BOB): Principal("bob")}, required=True)
    with serve_in_thread(create_app(gw, keys)) as url:
        yield url, gw
    gw.close()


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _open_body(tiny_target) -> dict:
    return OpenSession(prompt_tokens=[256, 72, 105], tokenizer_fingerprint=tiny_target.tokenizer.fingerprint).model_dump(mode="json")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}, {"authorization": "Bearer"}])
def test_no_or_bad_key_is_401(keyed, tiny_target, headers):
    url, _ = keyed
    for method, path, body in [("POST", "/v1/sessions", _open_body(tiny_target)), ("GET", "/v1/info", None), ("GET", "/v1/models", None)]:
        r = httpx.request(method, url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "key" in r.text.lower()
    # liveness, readiness and metrics stay open to probes
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(url + path).status_code == 200


def test_a_session_answers_only_to_its_key(keyed, tiny_target):
    url, _ = keyed
    opened = httpx.post(url + "/v1/sessions", json=_open_body(tiny_target), headers=_auth(ALICE)).json()
    sid, pos = opened["session_id"], opened["position"]
    verify = {"session_id": sid, "position": pos, "draft_tokens": [1], "draft_probs": [0.5]}
    append = {"session_id": sid, "position": pos, "tokens": [65]}
    for path, body in [("/v1/sessions/verify", verify), ("/v1/sessions/append", append), ("/v1/sessions/close", {"session_id": sid})]:
        r = httpx.post(url + path, json=body, headers=_auth(BOB))
        assert r.status_code == 404, r.text
        # exactly what a session that does not exist gets: nothing tells bob it is alice's
        assert r.json()["code"] == "unknown_session" and "closed, expired or never opened" in r.json()["message"]
    ok = httpx.post(url + "/v1/sessions/verify", json=verify, headers=_auth(ALICE))
    assert ok.status_code == 200 and ok.json()["session_id"] == sid
    assert httpx.post(url + "/v1/sessions/close", json={"session_id": sid}, headers=_auth(ALICE)).status_code == 200


def test_transport_maps_401_and_foreign_session(keyed, tiny_target):
    url, _ = keyed

    async def go():
        async with HttpTransport(url) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.info()
        async with HttpTransport(url, headers=_auth(ALICE)) as alice, HttpTransport(url, headers=_auth(BOB)) as bob:
            opened = await alice.request(OpenSession(**_open_body(tiny_target)))
            with pytest.raises(UnknownSessionError):
                await bob.request(VerifyRequest(session_id=opened.session_id, position=opened.position, draft_tokens=[], draft_probs=[]))
            with pytest.raises(UnknownSessionError):
                await bob.request(AppendRequest(session_id=opened.session_id, position=opened.position, tokens=[]))

    run(go())


def test_client_with_api_key_equals_target_alone(keyed, tiny_target):
    url, _ = keyed

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=url, api_key=BOB, draft_len=3) as c:
            return await c.generate("Hello", max_new_tokens=16, chat=False)

    rec = run(go())
    assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("Hello", chat=False), 16))


def test_keys_from_config_hash_and_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_TEST_KEY", "secret-from-env")
    cfg = GatewayConfig(keys=[KeyConfig(id="a", sha256=hash_key("hashed-key"), max_sessions=2), KeyConfig(id="b", env="TANDEM_TEST_KEY")])
    ring = cfg.keyring()
    assert cfg.auth_mode == "keys" and ring.required and len(ring) == 2
    assert ring.authenticate("Bearer hashed-key") == Principal("a", max_sessions=2)
    assert ring.authenticate("bearer secret-from-env").id == "b"
    with pytest.raises(AuthenticationError, match="unknown"):
        ring.authenticate("Bearer other")
    # an environment key that is not set is disabled, not a crash
    monkeypatch.delenv("TANDEM_TEST_KEY")
    assert len(cfg.keyring()) == 1


def test_auth_is_explicit_off_loopback():
    assert GatewayConfig().auth_mode == "none"
    GatewayConfig().check_exposure()  # loopback without keys: a development gateway
    with pytest.raises(ValueError, match="refusing"):
        GatewayConfig(host="0.0.0.0").check_exposure()
    GatewayConfig(host="0.0.0.0", auth="none").check_exposure()  # written out: allowed
    with pytest.raises(ValueError, match="no keys"):
        GatewayConfig(auth="keys")
    with pytest.raises(ValueError, match="exactly one"):
        KeyConfig(id="x")
    with pytest.raises(ValueError, match="unique"):
        GatewayConfig(keys=[KeyConfig(id="x", env="A"), KeyConfig(id="x", env="B")])


def test_without_keys_everyone_is_anonymous(tiny_server, tiny_target):
    """The tests' and the SDK's gateways have no keys: a header is ignored, not required."""
    r = httpx.post(tiny_server + "/v1/sessions", json=_open_body(tiny_target), headers=_auth("anything"))
    assert r.status_code == 200
    assert httpx.get(tiny_server + "/v1/info").json()["auth"] is False
