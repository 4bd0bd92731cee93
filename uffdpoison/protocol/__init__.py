"""Sans-IO wire protocol between a uffdpoison source and destination (h11-style).

``layout`` holds every limit and fixed layout once; ``events`` the vocabulary; ``codec`` one
frame ⇄ one event; ``framing`` a byte stream ⇄ frames; ``connection`` the rules of one channel.
Byte layout and rules: docs/PROTOCOL.md.
"""

from uffdpoison.protocol.connection import (
    Connection as Connection,
)
from uffdpoison.protocol.connection import (
    check_poison_list as check_poison_list,
)
from uffdpoison.protocol.connection import (
    open_pair as open_pair,
)
from uffdpoison.protocol.events import (
    CLOSED as CLOSED,
)
from uffdpoison.protocol.events import (
    ERROR_CODES as ERROR_CODES,
)
from uffdpoison.protocol.events import (
    NEED_DATA as NEED_DATA,
)
from uffdpoison.protocol.events import (
    Channel as Channel,
)
from uffdpoison.protocol.events import (
    Done as Done,
)
from uffdpoison.protocol.events import (
    Error as Error,
)
from uffdpoison.protocol.events import (
    Event as Event,
)
from uffdpoison.protocol.events import (
    Hello as Hello,
)
from uffdpoison.protocol.events import (
    PageKind as PageKind,
)
from uffdpoison.protocol.events import (
    Pages as Pages,
)
from uffdpoison.protocol.events import (
    ProtocolError as ProtocolError,
)
from uffdpoison.protocol.events import (
    Request as Request,
)
from uffdpoison.protocol.events import (
    Side as Side,
)
from uffdpoison.protocol.events import (
    State as State,
)
from uffdpoison.protocol.events import (
    Welcome as Welcome,
)
from uffdpoison.protocol.layout import (
    BASE_PAGE_SIZE as BASE_PAGE_SIZE,
)
from uffdpoison.protocol.layout import (
    MAGIC as MAGIC,
)
from uffdpoison.protocol.layout import (
    MAX_AUTH as MAX_AUTH,
)
from uffdpoison.protocol.layout import (
    MAX_CODE as MAX_CODE,
)
from uffdpoison.protocol.layout import (
    MAX_HEADER as MAX_HEADER,
)
from uffdpoison.protocol.layout import (
    MAX_MESSAGE as MAX_MESSAGE,
)
from uffdpoison.protocol.layout import (
    MAX_PAGES as MAX_PAGES,
)
from uffdpoison.protocol.layout import (
    MAX_PAYLOAD as MAX_PAYLOAD,
)
from uffdpoison.protocol.layout import (
    MAX_SESSION as MAX_SESSION,
)
from uffdpoison.protocol.layout import (
    PREFIX_SIZE as PREFIX_SIZE,
)
from uffdpoison.protocol.layout import (
    PROTOCOL_VERSION as PROTOCOL_VERSION,
)
from uffdpoison.protocol.layout import (
    PUSH_ID as PUSH_ID,
)
