import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB."""
    noise = (ref - out).double().pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise.clamp_min(1e-30)))


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(ref.flatten().double(), out.flatten().double(), dim=0))
