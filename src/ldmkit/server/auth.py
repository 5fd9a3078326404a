"""API keys, browser origins, and the refusal to listen on a network without a key.

With `ldmkit serve --api-key KEY` (or LDMKIT_API_KEY) every API route needs the key, sent
the way its clients send one: `Authorization: Bearer KEY` (the openai SDK, Open WebUI),
`x-api-key: KEY`, or HTTP Basic with KEY as the password (A1111's `--api-auth`, which
Open WebUI and webuiapi speak). /health, the page and its script, and the API's own
description (/docs, /openapi.json) stay open: they run nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from ldmkit.errors import UserError
from ldmkit.server.service import Refusal

KEY_ENV = "LDMKIT_API_KEY"


def presented_keys(request: Request) -> list[str]:
    """Every key the request carries, in any of the three ways."""
    keys = []
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(value.strip())
    elif scheme.lower() == "basic":
        try:
            keys.append(base64.b64decode(value.strip(), validate=True).decode()
                        .partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    if "x-api-key" in request.headers:
        keys.append(request.headers["x-api-key"].strip())
    return keys


def matches(given: str, key: str) -> bool:
    """Constant-time: how much of a guess was right must not show in the reply's timing."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8"))


async def require_key(request: Request) -> None:
    """A router dependency: passes when the server has no key or the request holds it."""
    key = request.app.state.api_key
    if key is None:
        return
    keys = presented_keys(request)
    if not any([matches(given, key) for given in keys]):  # a list: compare them all
        said = "a wrong API key" if keys else "no API key"
        raise Refusal("unauthorized", f"this server needs an API key and the request has "
                      f"{said}: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                      code="invalid_api_key")


def check_key(key: str | None) -> str | None:
    """The key as given (surrounding whitespace dropped: a pasted newline is no part of
    it), None for none; an empty or blank key is refused, never taken as "no key"."""
    if key is None:
        return None
    key = key.strip()
    if not key:
        raise UserError(f"--api-key (or {KEY_ENV}) is empty; give a key or leave it unset")
    return key


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Let pages on these origins (e.g. http://localhost:3000, or *) call the API from a
    browser; preflights pass without a key, as browsers send none with them."""
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key"],
                           expose_headers=["Retry-After"])


def is_loopback(host: str) -> bool:
    """True when every address `host` names is this machine's loopback."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False  # check_address reports the bad name itself
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                               for info in infos)


def check_exposure(host: str, key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine with no key, unless told the network is
    trusted: anyone who can reach the port could otherwise run the model at will."""
    if key is None and not insecure and not is_loopback(host):
        raise UserError(f"--host {host} listens beyond this machine, and with no API key "
                        "anyone who can reach the port can run the model. Give --api-key "
                        f"KEY (or set {KEY_ENV}), or add --insecure if every client on "
                        "that network is trusted")
