"""The benchmark/test harness (``uffdpoison._harness``, built from ``csrc/harness/``): the C
"vCPU" toucher and the C reference the benchmarks compare against. Not part of the product:
only ``uffdpoison.bench``, ``uffdpoison.demo``, the tests and the examples may
import it."""
