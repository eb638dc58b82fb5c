"""The ``lab`` command line's parser: every option of ``lab train``, ``lab compare`` and ``lab dashboard``.

Its own module so that the CLI (:mod:`lab.cli`) and the dashboard's Launch tab (:mod:`lab.dashboard.launch`,
which validates a form against ``lab compare``'s own parser) both import it, and neither imports the other.
A run's options are generated from :class:`lab.run_config.RunConfig`'s fields (their help, converter and
choices are defined there, once); only the comparison's own (``--seeds``, ``--workers``, ``--resume``,
``--out``, the aggregator names) and ``lab dashboard``'s are written here.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lab.access import LOCALHOST
from lab.aggregators import AGGREGATORS, DEFAULT_AGGREGATORS, parse_names
from lab.auto_alpha import check_alpha_setting
from lab.run_config import RunConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty: give the folder to write the runs into, e.g. --out runs/mine"
        )
    return Path(text)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}")
    return value


def _aggregator_list(text: str) -> list[str]:
    try:
        return parse_names(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _alpha(text: str) -> float | str:
    try:
        return check_alpha_setting(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _length_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    return lo, hi


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


#: The converters a RunConfig field's ``parse`` names (lab.run_config.option).
PARSERS = {
    "positive_int": _positive_int,
    "alpha": _alpha,
    "length_range": _length_range,
    "non_negative_float": _non_negative_float,
    "comma_list": _comma_list,
}


def run_options() -> list[dataclasses.Field]:
    """The RunConfig fields that are command-line options (those made with lab.run_config.option), in order."""
    return [f for f in dataclasses.fields(RunConfig) if "help" in f.metadata]


def _flag_settings(f: dataclasses.Field) -> dict[str, Any]:
    """argparse settings of one RunConfig field: its converter or type, choices, help. Every default is None,
    so an option not given leaves the RunConfig default (see :func:`run_option_values`)."""
    settings: dict[str, Any] = {"default": None, "help": f.metadata["help"], **f.metadata["cli"]}
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if f.metadata["parse"]:
        settings["type"] = PARSERS[f.metadata["parse"]]
    elif kind == "bool":  # off by default: the flag turns it on
        settings["action"] = "store_true"
    elif kind == "bool | None":  # None: the preset decides; --x / --no-x
        settings["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("int"):
        settings["type"] = int
    elif kind.startswith("float"):
        settings["type"] = float
    if settings.get("choices") is not None:
        settings["choices"] = list(settings["choices"])
    return settings


def run_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields ``args`` set (options not given are left out: RunConfig's default applies)."""
    return {f.name: getattr(args, f.name) for f in run_options() if getattr(args, f.name, None) is not None}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig option (lab.run_config), then the comparison's own: seeds, workers, resume, out."""
    for f in run_options():
        p.add_argument("--" + f.name.replace("_", "-"), **_flag_settings(f))
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="repeat each aggregator with S seeds (fast: 5, else 1)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="runs trained at the same time, each in its own process (fast: 2, else 1)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint(s) in --out")
    p.add_argument("--out", required=True, type=_out_dir, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="ΔL Lab: compare loss aggregators for RLVR.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one aggregator (× --seeds) into --out/<run_id>/")
    train.add_argument("--aggregator", default="delta_l", choices=list(AGGREGATORS))
    _add_run_options(train)
    compare = sub.add_parser(
        "compare", help="train several aggregators on identical prompts/seeds into --out"
    )
    compare.add_argument(
        "--aggregators",
        type=_aggregator_list,
        default=list(DEFAULT_AGGREGATORS),
        help=f"comma list of {','.join(AGGREGATORS)} (default {','.join(DEFAULT_AGGREGATORS)})",
    )
    _add_run_options(compare)
    dash = sub.add_parser(
        "dashboard", help="serve the Streamlit dashboard on localhost (streamlit run app.py)"
    )
    dash.add_argument("--runs-dir", default="runs", help="the runs to show (default runs)")
    dash.add_argument("--port", type=_port, default=8501, help="default 8501")
    dash.add_argument(
        "--host",
        default=LOCALHOST,
        help=f"address to listen on (default {LOCALHOST}: this machine only). 0.0.0.0 serves on the network: "
        "the runs dir is then fixed and the Launch tab disabled unless LAB_LAUNCH_TOKEN is set",
    )
    return parser
