"""What `strata chat` and `strata bench` share: an OpenAI client of a server, the model to use, and the server's
errors in one line."""
from __future__ import annotations


class ServerError(Exception):
    """The server cannot be used as asked (unreachable, key refused, no such model): one line, exit status 1."""


def api_base(url: str) -> str:
    """The OpenAI base URL of a server given as http://host:port or http://host:port/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def openai_client(url: str, api_key: str | None):
    import os

    import openai

    return openai.OpenAI(base_url=api_base(url), api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                         max_retries=0)


def error_message(error, base_url) -> str:
    import openai

    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return f"cannot reach the server at {str(base_url).rstrip('/')} ({str(cause) or type(cause).__name__})"
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or error.message
        if error.status_code == 401:
            return f"the server refused the API key ({message}); pass the right one with --api-key"
        return f"the server answered {error.status_code}: {message}"
    return str(error)


def pick_model(client, wanted: str | None) -> str:
    """`wanted` if the server serves it; by default the server's first model."""
    import openai

    try:
        served = [m.id for m in client.models.list()]
    except openai.APIError as e:
        raise ServerError(error_message(e, client.base_url)) from None
    if not served:
        raise ServerError(f"the server at {client.base_url} serves no model")
    if wanted is None:
        return served[0]
    if wanted not in served:
        raise ServerError(f"the server has no model {wanted!r}; it serves: {', '.join(served[:20])}")
    return wanted
