"""Sans-IO wire protocol between a uffdpoison source and destination (h11-style).

``layout`` holds every limit and fixed layout once; ``events`` the vocabulary; ``codec`` one
frame ⇄ one event; ``framing`` a byte stream ⇄ frames; ``connection`` the rules of one channel.
Byte layout and rules: docs/PROTOCOL.md.
"""

from uffdpoison.protocol.connection import Connection, check_poison_list, open_pair
from uffdpoison.protocol.events import (
    CLOSED,
    ERROR_CODES,
    NEED_DATA,
    Channel,
    Done,
    Error,
    Event,
    Hello,
    PageKind,
    Pages,
    ProtocolError,
    Request,
    Side,
    State,
    Welcome,
)
from uffdpoison.protocol.layout import (
    BASE_PAGE_SIZE,
    MAGIC,
    MAX_AUTH,
    MAX_CODE,
    MAX_HEADER,
    MAX_MESSAGE,
    MAX_PAGES,
    MAX_PAYLOAD,
    MAX_SESSION,
    PREFIX_SIZE,
    PUSH_ID,
    VERSION,
)

PROTOCOL_VERSION = VERSION

__all__ = [
    "BASE_PAGE_SIZE",
    "CLOSED",
    "ERROR_CODES",
    "MAGIC",
    "MAX_AUTH",
    "MAX_CODE",
    "MAX_HEADER",
    "MAX_MESSAGE",
    "MAX_PAGES",
    "MAX_PAYLOAD",
    "MAX_SESSION",
    "NEED_DATA",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "PUSH_ID",
    "VERSION",
    "Channel",
    "Connection",
    "Done",
    "Error",
    "Event",
    "Hello",
    "PageKind",
    "Pages",
    "ProtocolError",
    "Request",
    "Side",
    "State",
    "Welcome",
    "check_poison_list",
    "open_pair",
]
