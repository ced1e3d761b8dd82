"""Every test starts and ends with a clean Dynamo cache, so compile counts are its own."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
