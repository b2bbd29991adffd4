"""The front's errors for a request it cannot serve as sent (no imports: any module may raise
them without an import cycle)."""


class RequestError(ValueError):
    """The request cannot be served as sent; the message is meant for the client (HTTP 400)."""


class PromptTooLongError(RequestError):
    """The prompt alone is over the token limit (OpenAI's `context_length_exceeded`)."""
