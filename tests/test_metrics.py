import pytest
import torch

from longroll.eval.metrics import psnr, ssim


def test_psnr_known_value_and_identity():
    a = torch.zeros(2, 3, 16, 16)
    b = a + 0.1
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_identity_and_ordering():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g)
    small = (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    large = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert (ssim(a, small) > ssim(a, large)).all()


def test_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
