"""Sans-IO wire protocol between a uffdpoison source and destination (h11-style).

``layout`` holds every limit and fixed layout once; ``events`` the vocabulary; ``codec`` one
frame ⇄ one event; ``framing`` a byte stream ⇄ frames; ``connection`` the rules of one channel.
Byte layout and rules: docs/PROTOCOL.md.
"""

from uffdpoison.protocol.connection import (
    Connection as Connection,
    check_poison_list as check_poison_list,
    open_pair as open_pair,
)
from uffdpoison.protocol.events import (
    CLOSED as CLOSED,
    ERROR_CODES as ERROR_CODES,
    NEED_DATA as NEED_DATA,
    Challenge as Challenge,
    Channel as Channel,
    Done as Done,
    Error as Error,
    Event as Event,
    Have as Have,
    Hello as Hello,
    PageKind as PageKind,
    Pages as Pages,
    Proof as Proof,
    ProtocolError as ProtocolError,
    Request as Request,
    Side as Side,
    State as State,
    Welcome as Welcome,
)
from uffdpoison.protocol.layout import (
    AUTH_MAC as AUTH_MAC,
    AUTH_NONCE as AUTH_NONCE,
    BASE_PAGE_SIZE as BASE_PAGE_SIZE,
    EPOCH as EPOCH,
    MAGIC as MAGIC,
    MAX_AUTH as MAX_AUTH,
    MAX_CODE as MAX_CODE,
    MAX_HEADER as MAX_HEADER,
    MAX_MESSAGE as MAX_MESSAGE,
    MAX_PAGES as MAX_PAGES,
    MAX_PAYLOAD as MAX_PAYLOAD,
    MAX_SESSION as MAX_SESSION,
    PREFIX_SIZE as PREFIX_SIZE,
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    PUSH_ID as PUSH_ID,
)
