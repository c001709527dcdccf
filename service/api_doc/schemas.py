"""The document's components: bodies, responses and security schemes, shared by operations."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.auth.schemas import Credentials, EmailChange, PasswordChange, Registration
from service.oauth.clients import AUTH_METHODS
from service.oauth.scopes import SCOPES
from service.oauth.server import metadata

Schema = dict[str, Any]

PROBLEM_JSON = "application/problem+json"
JSON = "application/json"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"
CLIENT_FIELDS: dict[str, Any] = {
    "client_id": {"type": "string", "description": "client_secret_post, or a public client."},
    "client_secret": {"type": "string", "description": "client_secret_post."},
}
SCOPE_TEXT = "Space-separated scopes, each one of: " + ", ".join(SCOPES) + "."


def ref(kind: str, name: str) -> Schema:
    """A reference to a component."""
    return {"$ref": f"#/components/{kind}/{name}"}


def string(description: str, **keywords: Any) -> Schema:
    """A string property."""
    return {"type": "string", "description": description, **keywords}


def obj(properties: Schema, *, required: tuple[str, ...] = (), **keywords: Any) -> Schema:
    """An object schema whose listed properties are required; others may appear."""
    schema: Schema = {"type": "object", "properties": properties, **keywords}
    if required:
        schema["required"] = list(required)
    return schema


def model_schema(model: type[BaseModel]) -> Schema:
    """The JSON Schema of a request model, exactly as the service validates it."""
    return model.model_json_schema()


def header(description: str, *, required: bool = True) -> Schema:
    """A response header carrying a string."""
    return {"description": description, "required": required, "schema": {"type": "string"}}


RETRY_AFTER = header("Seconds to wait before retrying.")
CHALLENGE = header("An RFC 6750 Bearer challenge naming the error.")


def response(description: str, content: Schema | None = None, **headers: Schema) -> Schema:
    """A response: its bodies' schemas by media type, and its headers."""
    result: Schema = {"description": description}
    if content:
        result["content"] = {media: {"schema": schema} for media, schema in content.items()}
    if headers:
        result["headers"] = headers
    return result


def problem_response(description: str, **headers: Schema) -> Schema:
    """An RFC 9457 problem-details response."""
    return response(description, {PROBLEM_JSON: ref("schemas", "Problem")}, **headers)


def oauth_error_response(description: str, **headers: Schema) -> Schema:
    """An RFC 6749 section 5.2 error response."""
    return response(description, {JSON: ref("schemas", "OAuthError")}, **headers)


def json_response(description: str, schema: str, **headers: Schema) -> Schema:
    """A JSON response whose body is the named component schema."""
    return response(description, {JSON: ref("schemas", schema)}, **headers)


def html_response(description: str, **headers: Schema) -> Schema:
    """A server-rendered HTML page."""
    return response(description, {HTML: {"type": "string"}}, **headers)


def redirect_response(description: str) -> Schema:
    """A redirect; Location says where."""
    return response(description, Location=header("Where to go next."))


def _metadata_schema() -> Schema:
    example = metadata(issuer="https://auth.example.com")
    properties: Schema = {
        key: {"type": "array", "items": {"type": "string"}}
        if isinstance(value, list)
        else {"type": "string"}
        for key, value in example.items()
    }
    return obj(properties, required=tuple(example), example=example)


SCHEMAS: dict[str, Schema] = {
    "Problem": obj(
        {
            "type": string("A URI naming the problem type; about:blank: the status says it all."),
            "title": string("The status's reason phrase."),
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": string("What went wrong with this request, for a person."),
            "errors": {
                "type": "array",
                "description": "Each invalid field of the body (400 only).",
                "items": obj(
                    {"field": string("Dotted path of the field."), "message": string("Why.")},
                    required=("field", "message"),
                ),
            },
        },
        required=("type", "title", "status"),
        description="RFC 9457 problem details.",
    ),
    "OAuthError": obj(
        {
            "error": string(
                "RFC 6749 error code (slow_down: too many failed client authentications).",
                examples=["invalid_request", "invalid_client", "invalid_grant", "slow_down"],
            ),
            "error_description": string("What went wrong, for a developer."),
            "error_uri": string("A page about the error."),
            "state": string("The authorization request's state, echoed."),
        },
        required=("error",),
        description="RFC 6749 section 5.2 error body of the OAuth endpoints.",
    ),
    "Credentials": model_schema(Credentials),
    "Registration": model_schema(Registration),
    "PasswordChange": model_schema(PasswordChange),
    "EmailChange": model_schema(EmailChange),
    "Account": obj(
        {
            "id": string("The account's id.", format="uuid"),
            "username": string("The account's username."),
            "email": {"type": ["string", "null"], "description": "The address, if any."},
        },
        required=("id", "username"),
    ),
    "TokenPair": obj(
        {
            "access_token": string("JWT for Authorization: Bearer.", format="jwt"),
            "refresh_token": string("JWT for POST /auth/refresh, spent on use.", format="jwt"),
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer", "description": "Seconds the access token lives."},
        },
        required=("access_token", "refresh_token", "token_type", "expires_in"),
    ),
    "Recorded": obj(
        {"status": {"const": "recorded"}, "detail": string("When the revocation takes effect.")},
        required=("status", "detail"),
        description="The revocation is recorded but the blocklist could not take it yet.",
    ),
    "Greeting": obj({"message": string("Hello, <username>!")}, required=("message",)),
    "Profile": obj(
        {"sub": string("The user's id."), "username": string("The user's name.")},
        required=("sub", "username"),
    ),
    "Email": obj(
        {"sub": string("The user's id."), "email": {"type": ["string", "null"]}},
        required=("sub", "email"),
    ),
    "Health": obj(
        {
            "status": {"const": "ok"},
            "worker": {"type": "integer", "description": "The worker's pid (EXPOSE_WORKER_ID)."},
        },
        required=("status",),
    ),
    "Readiness": obj(
        {
            "status": {"enum": ["ok", "unavailable"]},
            "checks": obj(
                {
                    "database": {"enum": ["ok", "down"]},
                    "blocklist": {"enum": ["ok", "down"]},
                    "signing_keys": {
                        "enum": ["ok", "unreadable"],
                        "description": "unreadable: no OAuth signing key may sign, for "
                        "SECRET_KEY differs from the one that sealed the stored keys.",
                    },
                },
                required=("database", "blocklist", "signing_keys"),
            ),
        },
        required=("status", "checks"),
    ),
    "TokenRequest": {
        "description": "One of the grants, by grant_type; a confidential client that does "
        "not use HTTP Basic adds client_id and client_secret (client_secret_post), a public "
        "client adds client_id.",
        "oneOf": [
            ref("schemas", "AuthorizationCodeRequest"),
            ref("schemas", "RefreshTokenRequest"),
            ref("schemas", "ClientCredentialsRequest"),
        ],
    },
    "AuthorizationCodeRequest": obj(
        {
            "grant_type": {"const": "authorization_code"},
            "code": string("The code from the redirect."),
            "redirect_uri": string("The authorization request's redirect_uri, if it had one."),
            "code_verifier": string("The PKCE verifier of the code_challenge."),
            **CLIENT_FIELDS,
        },
        required=("grant_type", "code", "code_verifier"),
    ),
    "RefreshTokenRequest": obj(
        {
            "grant_type": {"const": "refresh_token"},
            "refresh_token": string("The refresh token to spend; a replay revokes the grant."),
            "scope": string(f"At most what was granted. {SCOPE_TEXT}"),
            **CLIENT_FIELDS,
        },
        required=("grant_type", "refresh_token"),
    ),
    "ClientCredentialsRequest": obj(
        {
            "grant_type": {"const": "client_credentials"},
            "scope": string(
                f"Scopes the client is registered for (unknown ones are dropped; at least one "
                f"must remain); without it, all of them. {SCOPE_TEXT}"
            ),
            **CLIENT_FIELDS,
        },
        required=("grant_type",),
    ),
    "OAuthToken": obj(
        {
            "access_token": string("ES256 JWT with a kid.", format="jwt"),
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer"},
            "scope": string(SCOPE_TEXT),
            "refresh_token": string("Opaque; rotated on use (not for client_credentials)."),
        },
        required=("access_token", "token_type", "expires_in"),
    ),
    "TokenReference": obj(
        {
            "token": string("The access or refresh token."),
            "token_type_hint": {
                "enum": ["access_token", "refresh_token", ""],
                "description": "Where to look first; empty is as if omitted (RFC 6749 3.2).",
            },
            **CLIENT_FIELDS,
        },
        required=("token",),
    ),
    "Revoked": obj({}, description="Empty: revoked, or the token was unknown (RFC 7009 2.2)."),
    "Introspection": obj(
        {
            "active": {"type": "boolean"},
            "token_type": {"enum": ["Bearer", "refresh_token"]},
            "client_id": string("The client the token was issued to."),
            "scope": string(SCOPE_TEXT),
            "sub": string("The user's id, or the client's for client_credentials."),
            "aud": {"type": ["string", "array"]},
            "iss": string("The issuer."),
            "exp": {"type": "integer"},
            "iat": {"type": "integer"},
            "nbf": {"type": "integer"},
            "jti": string("The access token's id."),
        },
        required=("active",),
        description="RFC 7662: inactive tokens (unknown, expired, revoked, another client's) "
        "say only active: false.",
    ),
    "ConsentDecision": obj(
        {
            "csrf_token": string("The token embedded in the consent page."),
            "decision": string("approve approves; any other value denies.", examples=["deny"]),
        },
        required=("csrf_token", "decision"),
    ),
    "SignIn": obj(
        {
            "csrf_token": string("The token embedded in the sign-in page."),
            "next": string("Where to go once signed in: only /oauth/authorize is followed."),
            "username": string("The account's username."),
            "password": string("The account's password."),
        },
        required=("csrf_token", "username", "password"),
    ),
    "ServerMetadata": _metadata_schema(),
    "JWKS": obj(
        {
            "keys": {
                "type": "array",
                "items": obj(
                    {
                        "kty": {"const": "EC"},
                        "crv": {"const": "P-256"},
                        "x": string("Base64url x coordinate."),
                        "y": string("Base64url y coordinate."),
                        "kid": string("RFC 7638 thumbprint."),
                        "alg": {"const": "ES256"},
                        "use": {"const": "sig"},
                    },
                    required=("kty", "crv", "x", "y", "kid", "alg", "use"),
                ),
            }
        },
        required=("keys",),
    ),
    "OpenAPI": obj(
        {"openapi": string("3.1.x"), "info": {"type": "object"}, "paths": {"type": "object"}},
        required=("openapi", "info", "paths"),
        description="This document.",
    ),
}

RESPONSES: dict[str, Schema] = {
    "BadRequest": problem_response(
        "The body is not valid JSON, or a field is invalid (each listed in errors)."
    ),
    "Unauthorized": problem_response(
        "The Bearer token is missing, malformed, expired, revoked or of the wrong type.",
        **{"WWW-Authenticate": CHALLENGE},
    ),
    "Forbidden": problem_response(
        "The token may not do this: an OAuth token on a first-party endpoint, or a scope "
        "it lacks (WWW-Authenticate: insufficient_scope).",
        **{"WWW-Authenticate": header("The insufficient_scope challenge.", required=False)},
    ),
    "RequestTimeout": problem_response("The request body did not arrive in time."),
    "ContentTooLarge": problem_response("The request body is larger than MAX_BODY_BYTES."),
    "UnsupportedMediaType": problem_response("The body is not application/json."),
    "TooManyRequests": problem_response(
        "Too many failed sign-ins for this account or address.", **{"Retry-After": RETRY_AFTER}
    ),
    "Unavailable": problem_response(
        "PostgreSQL or Redis cannot answer, password hashing is saturated, or (OAuth tokens) "
        "no signing key can be unsealed with this SECRET_KEY; retry later.",
        **{"Retry-After": RETRY_AFTER},
    ),
    "OAuthBadRequest": oauth_error_response(
        "A parameter is missing, repeated or invalid, or the grant, scope or token type is."
    ),
    "OAuthUnauthorized": oauth_error_response(
        "invalid_client: the client is unknown or its credentials are wrong.",
        **{"WWW-Authenticate": header("Basic, when the client used HTTP Basic.", required=False)},
    ),
    "OAuthSlowDown": oauth_error_response(
        "slow_down: too many failed client authentications from this client or address.",
        **{"Retry-After": RETRY_AFTER},
    ),
}


def security_schemes(base_url: str) -> dict[str, Schema]:
    """How clients authenticate: tokens for the API, client credentials for OAuth."""
    scopes = {scope: f"Read the user's {scope}." for scope in SCOPES}
    token_url = f"{base_url}/oauth/token"
    return {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token: from POST /auth/login (first-party), or from "
            "POST /oauth/token (an OAuth client's, ES256 with a kid). The scheme name is read "
            "in any case.",
        },
        "refreshToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A first-party refresh token from POST /auth/login or /auth/refresh.",
        },
        "clientBasic": {
            "type": "http",
            "scheme": "basic",
            "description": "client_secret_basic: the client's id and secret, form-encoded, as "
            "HTTP Basic credentials. client_secret_post sends them as the form fields "
            "client_id and client_secret instead, and a public client (none) sends only "
            "client_id. Methods: " + ", ".join(AUTH_METHODS) + ".",
        },
        "oauth2": {
            "type": "oauth2",
            "description": "OAuth 2.0 access tokens issued by this service, sent as bearerAuth.",
            "flows": {
                "authorizationCode": {
                    "authorizationUrl": f"{base_url}/oauth/authorize",
                    "tokenUrl": token_url,
                    "refreshUrl": token_url,
                    "scopes": scopes,
                },
                "clientCredentials": {"tokenUrl": token_url, "scopes": scopes},
            },
        },
    }
