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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dits", description="Diffusion Transformers toolkit")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("dits: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as e:
        # Bad input: one line, exit code 2. DITS_DEBUG=1 shows the traceback.
        if os.environ.get("DITS_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"dits {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)
