"""The ``vaswani`` command: one sub-command per job, each a thin wrapper over the library.

Each area's sub-commands live in their own module and import torch and transformers only when they run, so
``vaswani --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from . import data, demo, models, pictures, training, translation

#: The sub-commands in the order ``vaswani --help`` lists them.
COMMANDS = [
    *demo.COMMANDS,
    *translation.COMMANDS,
    *training.COMMANDS,
    *data.COMMANDS,
    *models.COMMANDS,
    *pictures.COMMANDS,
]


class DefaultsShown(argparse.HelpFormatter):
    """Help that shows every option's default: appended where the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def installed_version() -> str:
    """The installed distribution's version (a source checkout not installed says so)."""
    try:
        return version("vaswani")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    """The ``vaswani`` parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="vaswani", description=__doc__.split("\n")[0], formatter_class=DefaultsShown)
    parser.add_argument("--version", action="version", version=f"vaswani {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for action in sub_parsers(parser):
        action.formatter_class = DefaultsShown
    return parser


def sub_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub-)sub-command parser under ``parser``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *sub_parsers(child)]
    return found


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from safetensors import SafetensorError

    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as err:  # ImportError: an optional extra that is not installed
        print(f"vaswani {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SafetensorError as err:  # a weights file the command read without checking it first
        print(
            f"vaswani {args.command}: error: a .safetensors weights file is truncated or damaged ({err}); "
            "copy or download it again, or save the model again",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C: say what is kept instead of a traceback (130 = 128 + SIGINT)
        print(f"\nvaswani {args.command}: interrupted{f'; {err}' if str(err) else ''}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
