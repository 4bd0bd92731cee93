"""The typed kernel boundary; the only package that imports ``uffdpoison._native``."""

from uffdpoison.kernel.digest import (
    digest as digest,
)
from uffdpoison.kernel.digest import (
    page_digests as page_digests,
)
from uffdpoison.kernel.errors import (
    AlreadyPopulated as AlreadyPopulated,
)
from uffdpoison.kernel.errors import (
    EventPending as EventPending,
)
from uffdpoison.kernel.errors import (
    FeatureMissing as FeatureMissing,
)
from uffdpoison.kernel.errors import (
    InvalidArgument as InvalidArgument,
)
from uffdpoison.kernel.errors import (
    NotAUserfaultfd as NotAUserfaultfd,
)
from uffdpoison.kernel.errors import (
    PartialProgress as PartialProgress,
)
from uffdpoison.kernel.errors import (
    RangeGone as RangeGone,
)
from uffdpoison.kernel.errors import (
    TargetGone as TargetGone,
)
from uffdpoison.kernel.errors import (
    UffdError as UffdError,
)
from uffdpoison.kernel.ledger import (
    Ledger as Ledger,
)
from uffdpoison.kernel.ledger import (
    LedgerError as LedgerError,
)
from uffdpoison.kernel.ledger import (
    PageState as PageState,
)
from uffdpoison.kernel.ledger import (
    PlaceResult as PlaceResult,
)
from uffdpoison.kernel.memory import (
    HUGE_PAGE_SIZE as HUGE_PAGE_SIZE,
)
from uffdpoison.kernel.memory import (
    PAGE_SIZE as PAGE_SIZE,
)
from uffdpoison.kernel.memory import (
    HugePagesUnavailable as HugePagesUnavailable,
)
from uffdpoison.kernel.memory import (
    Mapping as Mapping,
)
from uffdpoison.kernel.memory import (
    anon as anon,
)
from uffdpoison.kernel.memory import (
    hugetlb as hugetlb,
)
from uffdpoison.kernel.memory import (
    reserve_hugepages as reserve_hugepages,
)
from uffdpoison.kernel.memory import (
    shmem as shmem,
)
from uffdpoison.kernel.uffd import (
    DEFAULT_FEATURES as DEFAULT_FEATURES,
)
from uffdpoison.kernel.uffd import (
    NONCOOPERATIVE as NONCOOPERATIVE,
)
from uffdpoison.kernel.uffd import (
    Feature as Feature,
)
from uffdpoison.kernel.uffd import (
    Ioctl as Ioctl,
)
from uffdpoison.kernel.uffd import (
    RegisterMode as RegisterMode,
)
from uffdpoison.kernel.uffd import (
    Userfaultfd as Userfaultfd,
)
from uffdpoison.kernel.uffd import (
    open_paths as open_paths,
)
from uffdpoison.kernel.uffd import (
    probe_features as probe_features,
)
