"""The emulator's OAuth server, with no I/O: clients, grants, and the token endpoint's rules.

`OAuthServer` owns every credential the emulator knows: registered clients, the access and
refresh tokens issued and what each stands for (a `Grant`). `OAuthServer.exchange` is the
token endpoint (docs/protocol.md §1) as a function from a `TokenRequest` to an `Answer`;
`OAuthServer.grant_for` is the check every resource request makes. Time comes from an
injected clock, so expiry is tested without waiting.

Bulk expiry works by serial number rather than by walking the tables: every grant gets the
next serial when issued, and `expire_access` / `revoke_refresh` raise a floor below which no
grant is honoured, so "every token issued so far" is one comparison.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final
from urllib.parse import parse_qsl, unquote

import attrs

from ._answers import Answer, Json, Refusal

__all__ = [
    "READ",
    "SCOPES",
    "TOKEN_PATH",
    "WRITE",
    "Grant",
    "OAuthClient",
    "OAuthServer",
    "TokenRequest",
    "form_record",
    "scope_set",
]

SCOPES: Final = ("messages_read", "messages_write")
READ, WRITE = SCOPES
#: The token endpoint's path on its origin.
TOKEN_PATH: Final = "oauth/token"
_REDACTED: Final = "<redacted>"
#: RFC 6749 §5.1: token responses must not be cached.
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def scope_set(scopes: Iterable[str]) -> frozenset[str]:
    """Scopes as a set. A lone string is a space-separated list (RFC 6749 §3.3), not an
    iterable of one-letter scopes."""
    if isinstance(scopes, str):
        return frozenset(scopes.split())
    return frozenset(scopes)


def form_record(body: bytes) -> dict[str, str]:
    """A token request's form as the server records it, with its secrets redacted."""
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return {}
    for secret in ("client_secret", "refresh_token"):
        if secret in form:
            form[secret] = _REDACTED
    return form


@attrs.frozen
class OAuthClient:
    """A registered client: its secret, the most it may be granted, the user it acts as."""

    secret: str = attrs.field(repr=False)
    scopes: frozenset[str]
    user_id: int


@attrs.frozen
class Grant:
    """What a token (access or refresh) stands for. ``serial`` orders issue."""

    client_id: str
    scopes: frozenset[str]
    user_id: int
    serial: int
    expires_at: float | None = None


@attrs.frozen
class TokenRequest:
    """What the token endpoint needs of an HTTP request.

    Attributes:
        method: the HTTP method.
        content_type: the media type, without parameters.
        body: the raw body.
        authorization: the ``Authorization`` header ("" when absent).
        too_large: the body was over the server's limit (and is cut).
    """

    method: str
    content_type: str
    body: bytes = attrs.field(repr=False)
    authorization: str = attrs.field(default="", repr=False)
    too_large: bool = False


def _oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> Refusal:
    """An RFC 6749 §5.2 error answer."""
    hdrs = dict(_NO_STORE)
    hdrs.update(headers or {})
    body: Json = {"error": error, "error_description": description}
    return Refusal(status, error, description, hdrs, body=body)


def _bad(description: str) -> Refusal:
    return _oauth_error(400, "invalid_request", description)


class OAuthServer:
    """Clients, tokens and the token endpoint of one emulator.

    Args:
        token_ttl: seconds an access token lives (``expires_in``); None: until revoked, and
            no ``expires_in`` in the token response.
        clock: monotonic seconds; expiry is measured on it.
    """

    def __init__(
        self,
        *,
        token_ttl: float | None = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_ttl = token_ttl
        self.clock = clock
        self.clients: dict[str, OAuthClient] = {}
        self._access: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._serial = 0
        self._access_floor = 0
        self._refresh_floor = 0

    # -- credentials ------------------------------------------------------------------------

    def register(self, client_id: str, secret: str, *, scopes: Iterable[str], user_id: int) -> None:
        """A client the token endpoint accepts; it is granted at most ``scopes``."""
        self.clients[client_id] = OAuthClient(secret, scope_set(scopes), user_id)

    def _grant(
        self, client_id: str, scopes: frozenset[str], user_id: int, ttl: float | None
    ) -> Grant:
        self._serial += 1
        expires_at = None if ttl is None else self.clock() + ttl
        return Grant(client_id, scopes, user_id, self._serial, expires_at)

    def issue(
        self,
        client_id: str,
        scopes: Iterable[str],
        *,
        user_id: int,
        ttl: float | None,
    ) -> str:
        """A new access token for ``client_id`` (no refresh token); ``ttl`` None: no expiry."""
        token = "at_" + secrets.token_urlsafe(24)
        self._access[token] = self._grant(client_id, scope_set(scopes), user_id, ttl)
        return token

    def expire_access(self) -> None:
        """Every access token issued so far is dead from now on; refresh tokens still work."""
        self._access_floor = self._serial + 1
        self._access = {t: g for t, g in self._access.items() if g.serial >= self._access_floor}

    def revoke_refresh(self) -> None:
        """Every refresh token issued so far is dead (``invalid_grant``)."""
        self._refresh_floor = self._serial + 1
        self._refresh.clear()

    def grant_for(self, token: str | None) -> Grant | None:
        """What a bearer token stands for; None: missing, unknown, expired or revoked."""
        if token is None:
            return None
        grant = self._access.get(token)
        if grant is None or grant.serial < self._access_floor:
            return None
        if grant.expires_at is not None and self.clock() >= grant.expires_at:
            return None
        return grant

    def client_id_of(self, token: str | None) -> str | None:
        """The client a valid access token was issued to: what per-credential limits are keyed
        on (docs/protocol.md §5). None for a token that would get 401."""
        grant = self.grant_for(token)
        return grant.client_id if grant is not None else None

    # -- the token endpoint -----------------------------------------------------------------

    def exchange(self, request: TokenRequest, *, resource_uri: str) -> Answer:
        """The token endpoint's answer to ``request`` (docs/protocol.md §1)."""
        try:
            return self._exchange(request, resource_uri)
        except Refusal as refusal:
            return refusal.answer()

    def _exchange(self, request: TokenRequest, resource_uri: str) -> Answer:
        if request.method != "POST":
            raise _oauth_error(405, "invalid_request", "use POST", {"Allow": "POST"})
        if request.too_large:
            raise _oauth_error(413, "invalid_request", "request body too large")
        if request.content_type != "application/x-www-form-urlencoded":
            raise _bad("the body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(
                request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise _bad("body is not UTF-8") from None
        form: dict[str, str] = {}
        for key, value in pairs:
            if key in form:
                # RFC 6749 §3.2: parameters must not be included more than once.
                raise _bad(f"repeated parameter {key}")
            form[key] = value

        client_id, client = self._authenticate(request.authorization, form)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _bad("grant_type is required")
        if grant_type == "client_credentials":
            granted = self._client_credentials(client, form)
            user_id = client.user_id
        elif grant_type == "refresh_token":
            granted, user_id = self._refresh_grant(client_id, form)
        else:
            raise _oauth_error(
                400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported"
            )

        access = "at_" + secrets.token_urlsafe(24)
        refresh_token = "rt_" + secrets.token_urlsafe(24)
        self._access[access] = self._grant(client_id, granted, user_id, self.token_ttl)
        self._refresh[refresh_token] = self._grant(client_id, granted, user_id, None)
        body: Json = {"access_token": access, "token_type": "Bearer"}
        if self.token_ttl is not None:
            ttl = self.token_ttl
            body["expires_in"] = int(ttl) if float(ttl).is_integer() else ttl
        body["refresh_token"] = refresh_token
        body["scope"] = " ".join(s for s in SCOPES if s in granted)
        body["resource_uri"] = resource_uri
        body["user_id"] = user_id
        return Answer(200, body, dict(_NO_STORE))

    @staticmethod
    def _client_credentials(client: OAuthClient, form: Mapping[str, str]) -> frozenset[str]:
        """RFC 6749 §4.4: the scopes granted, at most what the client is allowed."""
        scope = form.get("scope")
        requested = frozenset(scope.split()) if scope else client.scopes
        unknown = requested - frozenset(SCOPES)
        if unknown:
            raise _oauth_error(400, "invalid_scope", f"unknown scope {' '.join(sorted(unknown))}")
        granted = requested & client.scopes
        if not granted:
            raise _oauth_error(400, "invalid_scope", "none of the requested scopes is allowed")
        return granted

    def _refresh_grant(self, client_id: str, form: Mapping[str, str]) -> tuple[frozenset[str], int]:
        """RFC 6749 §6: the scopes and user of a refresh, which rotates the refresh token."""
        refresh = form.get("refresh_token")
        if not refresh:
            raise _bad("refresh_token is required")
        old = self._refresh.get(refresh)
        if old is None or old.serial < self._refresh_floor or old.client_id != client_id:
            raise _oauth_error(400, "invalid_grant", "refresh token is invalid, expired or revoked")
        granted = old.scopes
        scope = form.get("scope")
        if scope:
            narrowed = frozenset(scope.split())
            if not narrowed <= old.scopes:
                raise _oauth_error(400, "invalid_scope", "scope exceeds the original grant")
            granted = narrowed
        # Rotation: the refresh token just used dies with this answer.
        del self._refresh[refresh]
        return granted, old.user_id

    def _authenticate(self, authorization: str, form: Mapping[str, str]) -> tuple[str, OAuthClient]:
        """RFC 6749 §2.3.1: HTTP Basic, or ``client_id``/``client_secret`` in the form."""
        basic: tuple[str, str] | None = None
        scheme, _, value = authorization.strip().partition(" ")
        if authorization and scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise _bad("malformed Basic credentials") from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise _bad("malformed Basic credentials")
            # The id and secret are form-encoded before going into the Basic header.
            basic = (unquote(user.replace("+", " ")), unquote(password.replace("+", " ")))
        if basic is not None:
            if "client_secret" in form:
                raise _bad("more than one client authentication method")
            if "client_id" in form and form["client_id"] != basic[0]:
                raise _bad("client_id does not match Basic credentials")
            client_id, secret = basic
        else:
            client_id = form.get("client_id", "")
            secret = form.get("client_secret", "")
        client = self.clients.get(client_id)
        if (
            not client_id
            or client is None
            or not secrets.compare_digest(client.secret.encode(), secret.encode())
        ):
            challenge = {"WWW-Authenticate": 'Basic realm="token"'} if basic is not None else None
            raise _oauth_error(401, "invalid_client", "client authentication failed", challenge)
        return client_id, client
