# The CFFI extension is built out-of-line (API mode) from csrc/; see csrc/build_ffi.py.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
