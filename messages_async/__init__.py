"""messages_async: an asyncio client for the Messages API.

Typed models, safe retries, shared rate limiting, prefetching cursor walks and bounded fan-out.
Start with :class:`Client`; everything public is re-exported here.
"""

from ._client import Client, Messages, __version__
from ._download import Downloaded, DownloadError
from ._errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    DecodeError,
    EventLoopError,
    InvalidCursorError,
    MessagesError,
    NotFoundError,
    PaginationError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ScopeError,
    ServerError,
    TokenEndpointUnreachableError,
    TransportError,
    UnsafeCursorError,
)
from ._hooks import ErrorView, RequestView, ResponseView
from ._limiter import ClientStats
from ._models import (
    Attachment,
    Chat,
    ChatFailed,
    ChatType,
    Message,
    MessagesPage,
    NewAttachment,
    Period,
)
from ._watch import Watch
from ._window_plan import Window
from ._windows import WindowPage

__all__ = [
    "ApiError",
    "Attachment",
    "AuthError",
    "BadRequestError",
    "Chat",
    "ChatFailed",
    "ChatType",
    "Client",
    "ClientClosedError",
    "ClientStats",
    "ConfigurationError",
    "DecodeError",
    "DownloadError",
    "Downloaded",
    "ErrorView",
    "EventLoopError",
    "InvalidCursorError",
    "Message",
    "Messages",
    "MessagesError",
    "MessagesPage",
    "NewAttachment",
    "NotFoundError",
    "PaginationError",
    "Period",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RequestView",
    "ResponseView",
    "ScopeError",
    "ServerError",
    "TokenEndpointUnreachableError",
    "TransportError",
    "UnsafeCursorError",
    "Watch",
    "Window",
    "WindowPage",
    "__version__",
]
