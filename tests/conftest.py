"""Fixtures every test gets: a fixed torch seed. The tiny configs, models and datasets live in `fixtures.py`."""

from __future__ import annotations

import pytest
import torch

from hf_hesso.modeling.architectures import ARCHITECTURES
from hf_hesso.slim import selfcheck


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_layout_table():
    """The layout table as a new process has it (written entries only, no inferred ones, no cached checks), before
    and after the test."""
    written = {k: v for k, v in ARCHITECTURES.items() if not v.inferred}
    selfcheck._CHECKED.clear()
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(written)
    selfcheck._CHECKED.clear()
