"""Where tests run the Triton kernel: on CUDA in the GPU suite (``make test-gpu``, ``LONGROLL_TEST_GPU=1``, the
interpreter off), else on CPU tensors through the interpreter."""

import os

import torch

GPU_SUITE = os.environ.get("LONGROLL_TEST_GPU", "") == "1"
KERNEL_DEVICE = torch.device("cuda" if GPU_SUITE else "cpu")
