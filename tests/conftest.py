import os

import pytest
import torch

# Triton kernels (igq_plugin.integrations.cuda) run on CPU tensors through Triton's interpreter when
# there is no GPU; triton reads this when the kernels are defined, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from igq_plugin.ops import cosine, sqnr_db  # noqa: F401  (shared metrics, imported by the tests)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every op test runs on the CPU, and on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
