"""Test-wide set-up.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before any kernel module
is imported (the @triton.jit decorator reads it). It is switched on only where there is no CUDA device. With
``LONGROLL_TEST_GPU=1`` (``make test-gpu``) the suite is the GPU suite: CUDA must be present and the
interpreter is forced off, so that the compiled kernels, cuDNN and CUDA graphs are what the tests check. Each
pytest-xdist worker gets one intra-op thread: two workers on two cores are faster than two oversubscribed
workers of two threads each.
"""

import os

import pytest
import torch

GPU_SUITE = os.environ.get("LONGROLL_TEST_GPU", "") == "1"

if GPU_SUITE:
    if not torch.cuda.is_available():
        raise pytest.UsageError("LONGROLL_TEST_GPU=1 (make test-gpu) needs a CUDA device; none is visible")
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
