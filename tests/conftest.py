"""pytest setup shared by all tests.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. Triton
picks interpreted vs compiled when a kernel is decorated (and again in some lazy imports at
launch), so TRITON_INTERPRET must be set before anything imports triton and stay set: hence
here, at conftest import. With a GPU it is left alone so the compiled kernels are tested.
Note the dispatcher (sra_fast.ops) then also routes CPU tensors to the kernels under the
default `auto` backend; tests that want the reference say `ops.use_backend("ref")`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # the `cuda` marker is declared in pytest.ini
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
