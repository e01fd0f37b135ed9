"""Test-wide set-up.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before any kernel module
is imported (the @triton.jit decorator reads it). It is switched on only where there is no CUDA device. With
``LONGROLL_TEST_GPU=1`` (``make test-gpu``) the suite is the GPU suite: CUDA must be present and the
interpreter is forced off, so that the compiled kernels, cuDNN and CUDA graphs are what the tests check. Each
pytest-xdist worker gets one intra-op thread: two workers on two cores are faster than two oversubscribed
workers of two threads each.
"""

import inspect
import os

import pytest
import torch

from tests.device import GPU_SUITE

if GPU_SUITE:
    if not torch.cuda.is_available():
        raise pytest.UsageError("LONGROLL_TEST_GPU=1 (make test-gpu) needs a CUDA device; none is visible")
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def _runs_the_kernel_on_cpu_tensors(item: pytest.Item) -> bool:
    """A test that launches the Triton kernel on CPU tensors (it needs the interpreter)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(value == "triton" for value in params.values()):
        return True
    fn = getattr(item, "function", None)
    try:
        source = inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        return False
    return 'backend="triton"' in source or "block_sparse_fwd" in source  # the backend, or the launcher itself


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the GPU suite, tests that run the Triton kernel on CPU tensors through the interpreter are skipped
    (the interpreter is off); modules that place the kernel's tensors on ``tests.device.KERNEL_DEVICE`` run,
    and tests/test_gpu.py checks the compiled kernels at the same odd shapes in bf16 and fp16."""
    if not GPU_SUITE:
        return
    skip = pytest.mark.skip(reason="runs the Triton kernel on CPU tensors (interpreter); see tests/test_gpu.py")
    for item in items:
        module = getattr(item, "module", None)
        if getattr(module, "KERNEL_DEVICE_AWARE", False):
            continue
        if _runs_the_kernel_on_cpu_tensors(item):
            item.add_marker(skip)
