"""Every operation the service answers, one entry per path and method of the URL map."""

from __future__ import annotations

from typing import Any

from service.api_doc.schemas import (
    FORM,
    JSON,
    PROBLEM_JSON,
    RETRY_AFTER,
    SCOPE_TEXT,
    Schema,
    header,
    html_response,
    json_response,
    problem_response,
    redirect_response,
    ref,
    response,
)

BEARER: list[Schema] = [{"bearerAuth": []}]
REFRESH: list[Schema] = [{"refreshToken": []}]
PUBLIC: list[Schema] = []
# client_secret_basic, or the form's client_id (and client_secret): client_secret_post, none.
CLIENT: list[Schema] = [{"clientBasic": []}, {}]


def scoped(scope: str) -> list[Schema]:
    """A first-party token, or an OAuth access token granted scope."""
    return [{"bearerAuth": []}, {"oauth2": [scope]}]


def responses(*names: str, **inline: Schema) -> Schema:
    """Responses by status: shared ones by component name, others inline as s200=..., s404=..."""
    shared = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "Forbidden": "403",
        "RequestTimeout": "408",
        "ContentTooLarge": "413",
        "UnsupportedMediaType": "415",
        "TooManyRequests": "429",
        "Unavailable": "503",
        "OAuthBadRequest": "400",
        "OAuthUnauthorized": "401",
        "OAuthSlowDown": "429",
    }
    result: Schema = {shared[name]: ref("responses", name) for name in names}
    result.update({status.removeprefix("s"): value for status, value in inline.items()})
    return dict(sorted(result.items()))


def json_body(schema: str) -> Schema:
    """A required JSON request body."""
    return {"required": True, "content": {JSON: {"schema": ref("schemas", schema)}}}


def form_body(schema: str) -> Schema:
    """A required form-encoded request body."""
    return {"required": True, "content": {FORM: {"schema": ref("schemas", schema)}}}


def query(name: str, description: str, *, required: bool = False, **keywords: Any) -> Schema:
    """A string query parameter."""
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string", **keywords},
    }


def operation(
    operation_id: str,
    tag: str,
    summary: str,
    description: str,
    security: list[Schema],
    answers: Schema,
    **extra: Any,
) -> Schema:
    """One operation."""
    return {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "security": security,
        "responses": answers,
        **extra,
    }


WITH_JSON_BODY = ("BadRequest", "RequestTimeout", "ContentTooLarge", "UnsupportedMediaType")
WITH_FORM_BODY = ("RequestTimeout", "ContentTooLarge")
REVOKED = {
    "s204": {"description": "Revoked: every worker refuses the tokens from now on."},
    "s202": json_response(
        "Recorded in PostgreSQL while Redis is down; in force once it answers, and until then "
        "no token is accepted.",
        "Recorded",
    ),
}
AUTHORIZE_PARAMETERS = [
    query("response_type", "Always code.", required=True, enum=["code"]),
    query("client_id", "The client's id.", required=True),
    query("redirect_uri", "One of the client's registered redirect URIs."),
    query("scope", SCOPE_TEXT),
    query("state", "Echoed back in the redirect."),
    query(
        "code_challenge",
        "PKCE challenge, BASE64URL(SHA-256(code_verifier)): required, for every client.",
        required=True,
        pattern="^[A-Za-z0-9._~-]{43,128}$",
    ),
    query("code_challenge_method", "Only S256.", required=True, enum=["S256"]),
]
AUTHORIZE_ERROR = response(
    "A parameter is wrong and there is no trusted redirect URI to report it to (an OAuth "
    "error), or the form's CSRF token does not match (a problem).",
    {JSON: ref("schemas", "OAuthError"), PROBLEM_JSON: ref("schemas", "Problem")},
)
AUTHORIZE_REDIRECT = redirect_response(
    "To the sign-in page when no one is signed in; else to the client's redirect URI with "
    "code and state, or with error (access_denied, invalid_scope, ...)."
)


PATHS: dict[str, dict[str, Schema]] = {
    "/auth/register": {
        "post": operation(
            "register",
            "auth",
            "Create an account",
            "Usernames and email addresses are unique regardless of case; passwords are hashed "
            "with Argon2id. Closed (403) when REGISTRATION_OPEN is false.",
            PUBLIC,
            responses(
                *WITH_JSON_BODY,
                "Unavailable",
                s201=json_response("The account.", "Account"),
                s403=problem_response("Self-registration is closed."),
                s409=problem_response("The username or the email address is taken."),
            ),
            requestBody=json_body("Registration"),
        )
    },
    "/auth/login": {
        "post": operation(
            "login",
            "auth",
            "Exchange credentials for a token pair",
            "An unknown username and a wrong password get the same answer at the same cost. "
            "Failed sign-ins are counted per account and address (429 past a limit).",
            PUBLIC,
            responses(
                *WITH_JSON_BODY,
                "TooManyRequests",
                "Unavailable",
                s200=json_response("A new login session.", "TokenPair"),
                s401=problem_response(
                    "The username or password is wrong.",
                    **{"WWW-Authenticate": header('Basic realm="authsvc"')},
                ),
            ),
            requestBody=json_body("Credentials"),
        )
    },
    "/auth/refresh": {
        "post": operation(
            "refresh",
            "auth",
            "Spend a refresh token for a new pair",
            "The presented refresh token is spent; presenting it again revokes the session.",
            REFRESH,
            responses(
                "Unauthorized",
                "Unavailable",
                s200=json_response("The new pair.", "TokenPair"),
            ),
        )
    },
    "/auth/logout": {
        "post": operation(
            "logout",
            "auth",
            "Revoke this session",
            "The access token and every refresh token of its login session.",
            BEARER,
            responses("Unauthorized", "Forbidden", "Unavailable", **REVOKED),
        )
    },
    "/auth/logout-all": {
        "post": operation(
            "logoutAll",
            "auth",
            "Revoke every session of the user",
            "Every token of the user issued so far, on every device.",
            BEARER,
            responses("Unauthorized", "Forbidden", "Unavailable", **REVOKED),
        )
    },
    "/auth/password": {
        "post": operation(
            "changePassword",
            "auth",
            "Change the password",
            "Ends every session of the user. A wrong current password is counted as a failed "
            "sign-in.",
            BEARER,
            responses(
                *WITH_JSON_BODY,
                "Unauthorized",
                "TooManyRequests",
                "Unavailable",
                s204={"description": "Changed; every session of the user is revoked."},
                s403=problem_response(
                    "The current password is wrong, or the token is an OAuth client's.",
                    **{
                        "WWW-Authenticate": header(
                            "insufficient_scope, for an OAuth token.", required=False
                        )
                    },
                ),
            ),
            requestBody=json_body("PasswordChange"),
        )
    },
    "/auth/email": {
        "post": operation(
            "changeEmail",
            "auth",
            "Set, change or remove the email address",
            "Needs the current password; null removes the address. A wrong current password "
            "is counted as a failed sign-in.",
            BEARER,
            responses(
                *WITH_JSON_BODY,
                "Unauthorized",
                "TooManyRequests",
                "Unavailable",
                s200=json_response("The account.", "Account"),
                s403=problem_response(
                    "The current password is wrong, or the token is an OAuth client's."
                ),
                s409=problem_response("The email address is taken."),
            ),
            requestBody=json_body("EmailChange"),
        )
    },
    "/auth/me": {
        "get": operation(
            "me",
            "auth",
            "The account behind the token",
            "First-party tokens only.",
            BEARER,
            responses(
                "Unauthorized",
                "Forbidden",
                "Unavailable",
                s200=json_response("The account.", "Account"),
            ),
        )
    },
    "/api/hello": {
        "get": operation(
            "hello",
            "api",
            "Greet the token's user",
            "From the token alone: the sample protected resource.",
            BEARER,
            responses("Unauthorized", "Unavailable", s200=json_response("A greeting.", "Greeting")),
        )
    },
    "/api/profile": {
        "get": operation(
            "profile",
            "api",
            "The token's user id and name",
            "Needs the scope profile.",
            scoped("profile"),
            responses(
                "Unauthorized",
                "Forbidden",
                "Unavailable",
                s200=json_response("The profile.", "Profile"),
            ),
        )
    },
    "/api/email": {
        "get": operation(
            "email",
            "api",
            "The token's user's email address",
            "Needs the scope email. null when the account has no address, or for a client acting "
            "for itself.",
            scoped("email"),
            responses(
                "Unauthorized",
                "Forbidden",
                "Unavailable",
                s200=json_response("The address.", "Email"),
            ),
        )
    },
    "/healthz": {
        "get": operation(
            "healthz",
            "health",
            "Liveness",
            "The process is alive and serving.",
            PUBLIC,
            responses(s200=json_response("Alive.", "Health")),
        )
    },
    "/readyz": {
        "get": operation(
            "readyz",
            "health",
            "Readiness",
            "PostgreSQL answers, a real revocation check passes and an OAuth signing key may sign.",
            PUBLIC,
            responses(
                s200=json_response("Ready.", "Readiness"),
                s503=response(
                    "Not ready: which check failed (or, when the database is too busy to "
                    "take the probe, a problem).",
                    {JSON: ref("schemas", "Readiness"), PROBLEM_JSON: ref("schemas", "Problem")},
                ),
            ),
        )
    },
    "/oauth/authorize": {
        "get": operation(
            "authorize",
            "oauth",
            "Authorization request",
            "Signs the user in if needed, then asks for consent (or reuses one already given) "
            "and redirects back with a code. PKCE with S256 is required.",
            PUBLIC,
            responses(
                "Unavailable",
                s200=html_response("The consent page."),
                s302=AUTHORIZE_REDIRECT,
                s400=AUTHORIZE_ERROR,
            ),
            parameters=AUTHORIZE_PARAMETERS,
        ),
        "post": operation(
            "authorizeDecision",
            "oauth",
            "Approve or deny",
            "The consent page's form, with the authorization request's query.",
            PUBLIC,
            responses(
                *WITH_FORM_BODY,
                "Unavailable",
                s302=AUTHORIZE_REDIRECT,
                s400=AUTHORIZE_ERROR,
            ),
            parameters=AUTHORIZE_PARAMETERS,
            requestBody=form_body("ConsentDecision"),
        ),
    },
    "/oauth/login": {
        "get": operation(
            "signInPage",
            "oauth",
            "The sign-in page",
            "The authorization flow's sign-in form.",
            PUBLIC,
            responses(
                "Unavailable",
                s200=html_response("The sign-in page."),
            ),
            parameters=[query("next", "Where to go once signed in (only /oauth/authorize).")],
        ),
        "post": operation(
            "signIn",
            "oauth",
            "Sign in",
            "Failed sign-ins are counted as for POST /auth/login.",
            PUBLIC,
            responses(
                *WITH_FORM_BODY,
                "Unavailable",
                s303=redirect_response("Signed in: back to the authorization request."),
                s400=problem_response(
                    "The form's CSRF token does not match the browser session's."
                ),
                s401=html_response("The page again: the username or password is wrong."),
                s429=html_response(
                    "The page again: too many failed sign-ins.",
                    **{"Retry-After": RETRY_AFTER},
                ),
            ),
            requestBody=form_body("SignIn"),
        ),
    },
    "/oauth/token": {
        "post": operation(
            "token",
            "oauth",
            "Token endpoint (RFC 6749)",
            "Grants: authorization_code (with PKCE), refresh_token (rotated; a replay revokes "
            "the grant), client_credentials.",
            CLIENT,
            responses(
                *WITH_FORM_BODY,
                "OAuthBadRequest",
                "OAuthUnauthorized",
                "OAuthSlowDown",
                "Unavailable",
                s200=json_response("The tokens.", "OAuthToken"),
            ),
            requestBody=form_body("TokenRequest"),
        )
    },
    "/oauth/revoke": {
        "post": operation(
            "revoke",
            "oauth",
            "Token revocation (RFC 7009)",
            "A refresh token is revoked with its whole grant; an access token by its id.",
            CLIENT,
            responses(
                *WITH_FORM_BODY,
                "OAuthBadRequest",
                "OAuthUnauthorized",
                "OAuthSlowDown",
                "Unavailable",
                s200=json_response("Revoked, or the token was unknown.", "Revoked"),
            ),
            requestBody=form_body("TokenReference"),
        )
    },
    "/oauth/introspect": {
        "post": operation(
            "introspect",
            "oauth",
            "Token introspection (RFC 7662)",
            "Confidential clients only; a client learns only about its own tokens, a resource "
            "server about any.",
            CLIENT,
            responses(
                *WITH_FORM_BODY,
                "OAuthBadRequest",
                "OAuthUnauthorized",
                "OAuthSlowDown",
                "Unavailable",
                s200=json_response("The token's state.", "Introspection"),
            ),
            requestBody=form_body("TokenReference"),
        )
    },
    "/.well-known/oauth-authorization-server": {
        "get": operation(
            "serverMetadata",
            "well-known",
            "Authorization server metadata (RFC 8414)",
            "Every URL under the configured issuer (JWT_ISSUER).",
            PUBLIC,
            responses(s200=json_response("The metadata.", "ServerMetadata")),
        )
    },
    "/.well-known/jwks.json": {
        "get": operation(
            "jwks",
            "well-known",
            "Signing keys of OAuth access tokens",
            "Every key whose tokens may still be alive.",
            PUBLIC,
            responses("Unavailable", s200=json_response("The JWK set.", "JWKS")),
        )
    },
    "/openapi.json": {
        "get": operation(
            "openapi",
            "docs",
            "This document",
            "OpenAPI 3.1.",
            PUBLIC,
            responses(s200=json_response("The document.", "OpenAPI")),
        )
    },
    "/docs": {
        "get": operation(
            "docs",
            "docs",
            "This document as a page",
            "Rendered by the service; it loads nothing from elsewhere.",
            PUBLIC,
            responses(s200=html_response("The page.")),
        )
    },
}
