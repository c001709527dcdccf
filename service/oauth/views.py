"""OAuth endpoints and pages: thin views over Authlib's server and the page helpers.

These views are plain functions on purpose: Authlib's hooks are synchronous, and wait on
the app's loop suspended (see bridge.py).
"""

from __future__ import annotations

from typing import cast

from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749.errors import InsecureTransportError, InvalidRequestError
from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from service.addresses import client_address
from service.auth.attempts import TooManyAttempts
from service.auth.credentials import verify_credentials
from service.auth.passwords import Passwords
from service.oauth import bridge, pages
from service.oauth.keys import SigningKeysSealedElsewhere
from service.oauth.parameters import repeated_parameter
from service.oauth.server import Server, metadata
from service.store.throttle import get_throttle
from service.store.users import Account

bp = Blueprint("oauth", __name__, template_folder="templates")

LOGIN_FAILED = "The username or password is wrong."
ONE_OF_EACH = frozenset({"oauth.authorize", "oauth.token", "oauth.revoke", "oauth.introspect"})
# Metadata changes only with a deployment; keys rotate, so the JWKS is kept briefly.
METADATA_CACHE = "public, max-age=3600"
JWKS_CACHE = "public, max-age=60"


def _server() -> Server:
    server: Server = current_app.extensions["oauth_server"]
    return server


def _page(template: str, status: int = 200, **context: object) -> Response:
    response = Response(render_template(template, **context), status=status)
    response.headers.update(pages.PAGE_HEADERS)
    return response


@bp.before_request
def _parameters_once() -> ResponseReturnValue | None:
    """Refuse a parameter sent twice (query and body together): which one counts is a guess."""
    if request.endpoint not in ONE_OF_EACH:
        return None
    name = repeated_parameter(request.args.items(multi=True), request.form.items(multi=True))
    if name is None:
        return None
    error = InvalidRequestError(description=f"The parameter {name} appears more than once.")
    return cast(Response, _server().handle_error_response(None, error))


@bp.errorhandler(InsecureTransportError)
def _insecure_transport(error: InsecureTransportError) -> Response:
    """400 insecure_transport: plain HTTP that no trusted proxy vouched for (PROXY_BIND)."""
    return cast(Response, _server().handle_error_response(None, error))


@bp.after_request
def _strict_transport(response: Response) -> Response:
    """Tell browsers to come back over HTTPS only (not in development: it may be localhost)."""
    if not bridge.settings().is_development:
        response.headers.setdefault("Strict-Transport-Security", pages.HSTS)
    return response


def _current_user() -> Account | None:
    found = pages.signed_in()
    if found is None:
        return None
    user_id, since = found
    return bridge.run(pages.find_account(store=bridge.store(), user_id=user_id, signed_in_at=since))


@bp.route("/oauth/authorize", methods=["GET", "POST"])
def authorize() -> ResponseReturnValue:
    """Sign in if needed, then ask for (or reuse) consent and redirect back with a code."""
    server, user = _server(), _current_user()
    try:
        grant = server.get_consent_grant(end_user=user)
    except OAuth2Error as error:
        return cast(Response, server.handle_error_response(None, error))
    if user is None:
        return redirect(url_for("oauth.login", next=request.full_path))
    client = grant.client
    # Exactly what the code will carry: the consent shown and recorded covers no more, no less.
    scope: str = grant.request.scope
    consent = {"store": bridge.store(), "user_id": user.id, "client_id": client.client_id}
    if request.method == "POST":
        pages.check_csrf(request.form.get("csrf_token"))
        approved = request.form.get("decision") == "approve"
        if approved:
            bridge.run(pages.remember_consent(**consent, scope=scope))
        granted = user if approved else None
        return cast(Response, server.create_authorization_response(grant=grant, grant_user=granted))
    if bridge.run(pages.has_consent(**consent, scope=scope)):
        return cast(Response, server.create_authorization_response(grant=grant, grant_user=user))
    csrf = pages.csrf_token()
    return _page("consent.html", client=client, user=user, scopes=scope.split(), csrf_token=csrf)


@bp.route("/oauth/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The sign-in form of the authorization flow."""
    next_url = pages.safe_next(request.values.get("next"))
    if request.method != "POST":  # GET, and HEAD alike
        return _page("login.html", next=next_url, csrf_token=pages.csrf_token())
    pages.check_csrf(request.form.get("csrf_token"))
    passwords: Passwords = current_app.extensions["passwords"]
    try:
        checked = bridge.run(
            verify_credentials(
                store=bridge.store(),
                passwords=passwords,
                throttle=get_throttle(),
                username=request.form.get("username", ""),
                password=request.form.get("password", ""),
                address=client_address(request.environ),
            )
        )
    except TooManyAttempts as refused:
        wait = f"Too many failed sign-in attempts; try again in {refused.retry_after} seconds."
        page = _page("login.html", 429, next=next_url, csrf_token=pages.csrf_token(), error=wait)
        page.headers.update(refused.headers)
        return page
    if checked is None:
        return _page(
            "login.html", 401, next=next_url, csrf_token=pages.csrf_token(), error=LOGIN_FAILED
        )
    pages.sign_in(checked[0])
    return redirect(next_url, code=303)


@bp.post("/oauth/token")
def token() -> Response:
    """Token endpoint (authorization_code, refresh_token, client_credentials)."""
    if bridge.keyring().sealed_elsewhere():
        # Refused before Authlib spends the code: a worker that can sign may take it later.
        raise SigningKeysSealedElsewhere()
    return cast(Response, _server().create_token_response())


@bp.post("/oauth/revoke")
def revoke() -> Response:
    """RFC 7009 revocation."""
    return cast(Response, _server().create_endpoint_response("revocation"))


@bp.post("/oauth/introspect")
def introspect() -> Response:
    """RFC 7662 introspection."""
    return cast(Response, _server().create_endpoint_response("introspection"))


@bp.get("/.well-known/oauth-authorization-server")
def server_metadata() -> ResponseReturnValue:
    """RFC 8414 authorization server metadata, every URL under the configured issuer."""
    response = current_app.json.response(metadata(issuer=bridge.settings().jwt_issuer))
    response.headers["Cache-Control"] = METADATA_CACHE
    return response


@bp.get("/.well-known/jwks.json")
def jwks() -> ResponseReturnValue:
    """Public keys of every access token that may still be alive."""
    response = current_app.json.response(bridge.keyring().jwks())
    response.headers["Cache-Control"] = JWKS_CACHE
    return response
