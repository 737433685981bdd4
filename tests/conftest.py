import pytest
import torch

from igq_plugin.ops import cosine, sqnr_db  # noqa: F401  (shared metrics, imported by the tests)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
