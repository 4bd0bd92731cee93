"""The typed kernel boundary; the only package that imports ``uffdpoison._native``."""

from uffdpoison.kernel.digest import (
    digest as digest,
    page_digests as page_digests,
)
from uffdpoison.kernel.errors import (
    AlreadyPopulated as AlreadyPopulated,
    EventPending as EventPending,
    FeatureMissing as FeatureMissing,
    InvalidArgument as InvalidArgument,
    NotAUserfaultfd as NotAUserfaultfd,
    PartialProgress as PartialProgress,
    RangeGone as RangeGone,
    TargetGone as TargetGone,
    UffdError as UffdError,
)
from uffdpoison.kernel.ledger import (
    Ledger as Ledger,
    LedgerError as LedgerError,
    PageState as PageState,
    PlaceResult as PlaceResult,
)
from uffdpoison.kernel.memory import (
    HUGE_PAGE_SIZE as HUGE_PAGE_SIZE,
    PAGE_SIZE as PAGE_SIZE,
    HugePagesUnavailable as HugePagesUnavailable,
    Mapping as Mapping,
    anon as anon,
    hugetlb as hugetlb,
    reserve_hugepages as reserve_hugepages,
    shmem as shmem,
)
from uffdpoison.kernel.uffd import (
    DEFAULT_FEATURES as DEFAULT_FEATURES,
    NONCOOPERATIVE as NONCOOPERATIVE,
    Feature as Feature,
    Ioctl as Ioctl,
    RegisterMode as RegisterMode,
    Userfaultfd as Userfaultfd,
    open_paths as open_paths,
    probe_features as probe_features,
)
