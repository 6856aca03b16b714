"""Fixtures every test gets: a fixed torch seed. The tiny configs, models and datasets live in `fixtures.py`."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
