"""Test-wide set-up.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before any kernel module
is imported (the @triton.jit decorator reads it). Each pytest-xdist worker gets one intra-op thread: two
workers on two cores are faster than two oversubscribed workers of two threads each.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
