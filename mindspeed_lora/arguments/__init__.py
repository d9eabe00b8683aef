"""One argparse for every script, assembled from flag groups (MindSpeed-LLM flag names).

Each script's parser is ``build_parser(script)``: the groups listed for it in ``SCRIPT_GROUPS``. Each group
module defines ``add_<group>_args(parser)`` and, where library code needs the values, a typed dataclass built
from the parsed namespace. Unknown flags are errors (no parse_known_args).
"""
from __future__ import annotations

import argparse
import importlib

# script -> ordered (module, function) pairs adding its flag groups
SCRIPT_GROUPS: dict[str, list[tuple[str, str]]] = {
    "preprocess_data": [("preprocess", "add_preprocess_args")],
    "convert_ckpt": [("convert", "add_convert_args")],
    "posttrain_gpt": [("training", "add_training_args")],
    "inference": [("inference", "add_inference_args")],
    "evaluation": [("inference", "add_evaluation_args")],
}


def build_parser(script: str) -> argparse.ArgumentParser:
    if script not in SCRIPT_GROUPS:
        raise KeyError(f"no parser for script {script!r}; known: {sorted(SCRIPT_GROUPS)}")
    parser = argparse.ArgumentParser(prog=f"{script}.py", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for module, fn in SCRIPT_GROUPS[script]:
        getattr(importlib.import_module(f"mindspeed_lora.arguments.{module}"), fn)(parser)
    return parser


def parse_args(script: str, argv=None) -> argparse.Namespace:
    return build_parser(script).parse_args(argv)
