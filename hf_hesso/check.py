"""`python -m hf_hesso.check <model_type or checkpoint dir>`: which group kinds of an architecture are exact.

Builds a tiny random instance of the config class (no weights are downloaded or loaded), checks every group kind
(zero some groups -> `slim_model` -> same outputs; save -> reload -> same outputs) and prints, per kind, the groups
found, exact or excluded and why, and whether `to_stock` can express uniform and uneven results.
"""

from __future__ import annotations

import argparse
import os
import sys

import transformers
from transformers import AutoConfig

from .slim.selfcheck import check_architecture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_hesso.check", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a `model_type` (e.g. `gemma2`) or a directory holding a config.json")
    args = parser.parse_args(argv)
    if os.path.isdir(args.model):
        config = AutoConfig.from_pretrained(args.model)
    else:
        try:
            config = AutoConfig.for_model(args.model)
        except ValueError as error:
            print(
                f"`{args.model}` is neither a directory nor a model type transformers knows: {error}", file=sys.stderr
            )
            return 2
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    report = check_architecture(config)
    print(report)
    return 0 if report.error is None and report.exact_kinds else 1


if __name__ == "__main__":
    raise SystemExit(main())
