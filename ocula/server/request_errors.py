"""The front's error for a request it cannot serve as sent (no imports, so any module may raise it)."""


class RequestError(ValueError):
    """The request cannot be served as sent; the message is meant for the client (HTTP 400)."""


class PromptTooLongError(RequestError):
    """The prompt alone is over the token limit (OpenAI's `context_length_exceeded`)."""
