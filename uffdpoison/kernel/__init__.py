"""The typed kernel boundary; the only package that imports ``uffdpoison._native``."""

from uffdpoison.kernel.digest import digest, page_digests
from uffdpoison.kernel.errors import (
    AlreadyPopulated,
    EventPending,
    FeatureMissing,
    InvalidArgument,
    NotAUserfaultfd,
    PartialProgress,
    RangeGone,
    TargetGone,
    UffdError,
)
from uffdpoison.kernel.events import Event, EventBatch, EventKind
from uffdpoison.kernel.ledger import Ledger, LedgerError, PageState, PlaceResult
from uffdpoison.kernel.memory import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    HugePagesUnavailable,
    Mapping,
    anon,
    hugetlb,
    reserve_hugepages,
    shmem,
)
from uffdpoison.kernel.uffd import (
    DEFAULT_FEATURES,
    NONCOOPERATIVE,
    Feature,
    Ioctl,
    RegisterMode,
    Userfaultfd,
    open_paths,
    probe_features,
)

__all__ = [
    "DEFAULT_FEATURES",
    "HUGE_PAGE_SIZE",
    "NONCOOPERATIVE",
    "PAGE_SIZE",
    "AlreadyPopulated",
    "Event",
    "EventBatch",
    "EventKind",
    "EventPending",
    "Feature",
    "FeatureMissing",
    "HugePagesUnavailable",
    "InvalidArgument",
    "Ioctl",
    "Ledger",
    "LedgerError",
    "Mapping",
    "NotAUserfaultfd",
    "PageState",
    "PartialProgress",
    "PlaceResult",
    "RangeGone",
    "RegisterMode",
    "TargetGone",
    "UffdError",
    "Userfaultfd",
    "anon",
    "digest",
    "hugetlb",
    "open_paths",
    "page_digests",
    "probe_features",
    "reserve_hugepages",
    "shmem",
]
