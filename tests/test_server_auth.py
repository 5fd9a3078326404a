"""API keys, CORS and the refusal to listen beyond this machine without a key: every API
route needs the key (each answering 401 in its API's shape), the three ways clients send
one all work, /health and the page stay open; `ldmkit serve --host 0.0.0.0` without a
key exits 2 saying why."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.server import auth
from ldmkit.server.app import create_app

KEY = "k3y-with-enough-letters"


APP_OPTIONS = {"api_key": KEY, "cors_origins": ["http://localhost:3000"]}  # conftest's client


def _api_routes(client) -> list[tuple[str, str]]:
    """(method, path) of every route in the API's own description, bar /health."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path.replace("{model}", "ldmkit"))
            for path, methods in paths.items() for method in methods if path != "/health"]


def test_every_api_route_needs_the_key(client):
    routes = _api_routes(client)
    assert len(routes) >= 12  # ours, OpenAI's and A1111's
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            reply = client.request(method, path, json={}, headers=headers)
            assert reply.status_code == 401, (method, path, headers)
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            body = reply.json()
            if path.startswith(("/v1/models", "/v1/images/generations", "/v1/images/edits")):
                assert body["error"]["code"] == "invalid_api_key"
            else:
                assert "API key" in body["detail"]


def _basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"user:{password}".encode()).decode()


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"},
                                     {"authorization": f"bearer {KEY}"},
                                     {"x-api-key": KEY},
                                     {"Authorization": _basic(KEY)},
                                     {"Authorization": "Bearer wrong", "x-api-key": KEY}],
                         ids=["bearer", "lowercase", "x-api-key", "basic", "one-of-two"])
def test_the_key_is_accepted_the_ways_clients_send_it(client, headers):
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.get("/sdapi/v1/options", headers=headers).status_code == 200
    reply = client.post("/v1/images", json={"prompt": "x", "steps": 1}, headers=headers)
    assert reply.status_code == 200


@pytest.mark.parametrize("header", ["Basic not-base64!", _basic("wrong"), "Token " + KEY])
def test_a_malformed_or_wrong_credential_is_a_401(client, header):
    assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_health_the_page_and_the_api_description_stay_open(client):
    assert client.get("/health").json()["auth"] is True
    assert "Generate" in client.get("/").text and "api-key" in client.get("/").text
    assert "withKey" in client.get("/static/page.js").text
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_keys_are_compared_in_constant_time(client, monkeypatch):
    seen = []

    def recording(a, b):
        seen.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    client.get("/v1/models", headers={"Authorization": "Bearer guess", "x-api-key": KEY})
    assert seen == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_a_browser_on_an_allowed_origin_may_call_the_api(client):
    preflight = client.options("/v1/images/generations", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200  # browsers send no key with a preflight
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    reply = client.get("/v1/models", headers={"Origin": "http://localhost:3000",
                                              "Authorization": f"Bearer {KEY}"})
    assert reply.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = client.get("/v1/models", headers={"Origin": "http://evil.example",
                                              "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers


def test_without_cors_origins_no_browser_origin_is_allowed(pipe):
    with TestClient(create_app(pipe)) as client:
        reply = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_without_a_key_the_api_is_open(pipe):
    with TestClient(create_app(pipe)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/health").json()["auth"] is False


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_listening_beyond_this_machine_needs_a_key_or_insecure(host):
    with pytest.raises(UserError, match="--api-key KEY .* --insecure"):
        auth.check_exposure(host, None, insecure=False)
    auth.check_exposure(host, KEY, insecure=False)
    auth.check_exposure(host, None, insecure=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_key(host):
    auth.check_exposure(host, None, insecure=False)


def test_serve_on_0000_without_a_key_exits_2_saying_why(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("LDMKIT_API_KEY", raising=False)
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 listens beyond this machine" in err and "--insecure" in err


@pytest.mark.parametrize("flags, env", [(["--api-key", "  "], None), ([], "")])
def test_an_empty_key_is_refused_not_taken_for_none(model_dir, capsys, monkeypatch, flags, env):
    if env is None:
        monkeypatch.delenv("LDMKIT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LDMKIT_API_KEY", env)
    assert main(["serve", "--model", str(model_dir), "--port", "0", *flags]) == 2
    assert "is empty" in capsys.readouterr().err
