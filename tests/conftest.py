"""Test-wide set-up. Triton kernels run on CPU tensors through the interpreter, which must be switched on
before any kernel module is imported (the @triton.jit decorator reads it)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
