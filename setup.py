# The CFFI extensions are built out-of-line (API mode): the product's uffdpoison._native from
# csrc/ (csrc/build_ffi.py) and the benchmark/test harness's uffdpoison._harness from
# csrc/harness/ (csrc/harness/build_harness.py).
from setuptools import setup

setup(
    cffi_modules=[
        "csrc/build_ffi.py:ffibuilder",
        "csrc/harness/build_harness.py:ffibuilder",
    ]
)
