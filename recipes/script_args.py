# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""The recipes' command line: a script's own dataclass plus `HESSOConfig`, with the recipe's defaults."""

from __future__ import annotations

import sys
from typing import Any

from transformers import HfArgumentParser

from hf_hesso import HESSOConfig


def parse_script_args(script_class: type, defaults: dict[str, Any], argv: list[str] | None = None) -> tuple:
    """Parse a script's own dataclass and `HESSOConfig` from the command line, with script-specific defaults.

    `defaults` override `HESSOConfig`'s defaults (any flag given on the command line wins). As `HESSOConfig` takes
    exactly one target, a `--target_group_sparsity` flag drops a default `target_param_sparsity`.

    Returns:
        `tuple`: `(script_args, hesso_config)`.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = dict(defaults)
    if any(arg.split("=")[0] == "--target_group_sparsity" for arg in argv):
        defaults.pop("target_param_sparsity", None)
    parser = HfArgumentParser((script_class, HESSOConfig))
    parser.set_defaults(**defaults)
    return tuple(parser.parse_args_into_dataclasses(args=argv))
