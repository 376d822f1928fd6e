"""The ``dits`` command: one entry point, one module per subcommand.

Each module in this package defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a function taking the parsed arguments. The functions are thin: the
work is done by the importable Python API.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from dits.errors import first_line

# subcommand name -> module in dits.cli
COMMANDS = {
    "train": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "flops": "flops",
    "extract-latents": "extract_latents",
    "convert": "convert",
    "bench": "bench",
    "study": "study",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines (what is wrong, where to look), not the
    whole usage block. Subcommand parsers are made from this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee {self.prog} --help\n")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    # Python's default shows the warning and the source line that raised it: two lines.
    print(f"dits: warning: {first_line(message, 400)}", file=file or sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dits", description="Diffusion Transformers toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"dits.cli.{module}")
        except ModuleNotFoundError as e:  # a subcommand not built yet
            if e.name == f"dits.cli.{module}":
                continue
            raise
        mod.register(sub)
    parser.subcommands = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # reported by the subcommand's parser, so the hint names its --help
                parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # usage error (2) or --help (0): a code, so in-process callers get one too
            return e.code if isinstance(e.code, int) else 2
        return _run(args)
    finally:
        warnings.showwarning = shown


def _run(args) -> int:
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("dits: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`dits study ... --print-commands | head`): not an error of ours;
        # point stdout at devnull so the interpreter's final flush does not complain either
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (e.g. captured)
            pass
        return 0
    except (ValueError, OSError, KeyError) as e:
        # Bad input: one line, exit code 2. DITS_DEBUG=1 shows the traceback.
        if os.environ.get("DITS_DEBUG"):
            raise
        msg = first_line(e, 400)
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"dits {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)
