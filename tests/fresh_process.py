"""Load saved models in a fresh interpreter where hf_hesso cannot be imported, and run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

FRESH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _BlockHfHesso(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_hesso" or name.startswith("hf_hesso."):
                raise ImportError("hf_hesso is blocked in this process")
            return None

    sys.meta_path.insert(0, _BlockHfHesso())
    try:
        import hf_hesso  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_hesso is importable in the fresh process")

    import torch
    import transformers

    jobs = json.loads(open(sys.argv[1]).read())
    results = {}
    for job in jobs:
        auto = getattr(transformers, job["auto"])
        kwargs = {"trust_remote_code": True} if job["remote"] else {}
        batch = torch.load(job["batch"])
        out = {}
        for impl in job["impls"]:
            model = auto.from_pretrained(job["dir"], attn_implementation=impl, **kwargs).eval()
            out["class"] = type(model).__module__ + "." + type(model).__name__
            with torch.no_grad():
                out["logits_" + impl] = model(**batch)[0]
                if job["generate"]:
                    out["generate_" + impl] = model.generate(
                        **batch, max_new_tokens=job["generate"], do_sample=False, pad_token_id=0, use_cache=True
                    )
        results[job["dir"]] = out
    assert not any(m == "hf_hesso" or m.startswith("hf_hesso.") for m in sys.modules), "hf_hesso was imported"
    torch.save(results, sys.argv[2])
    """
)


def run_fresh(jobs: list[dict], tmp: Path) -> dict:
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "fresh.py").write_text(FRESH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp / "fresh.py"), str(tmp / "jobs.json"), str(tmp / "out.pt")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(tmp / "out.pt")
