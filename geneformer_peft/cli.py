"""Command line interface: ``geneformer-peft <command> [options]``.

Each subcommand lives in its own module under :mod:`geneformer_peft.commands` and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. To add a command,
write such a module and add one line to :data:`COMMANDS`. Command modules import their heavy
dependencies inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Dict, List, Optional

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["COMMANDS", "build_parser", "main"]

#: command name -> module implementing it
COMMANDS: Dict[str, str] = {
    "tokenize": "geneformer_peft.commands.tokenize",
    "split": "geneformer_peft.commands.split",
    "pretrain": "geneformer_peft.commands.pretrain",
    "finetune": "geneformer_peft.commands.finetune",
    "predict": "geneformer_peft.commands.predict",
    "remap-vocab": "geneformer_peft.commands.remap_vocab",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="geneformer-peft",
        description="Parameter-efficient fine-tuning of Geneformer: data preparation, training, evaluation.",
    )
    parser.add_argument(
        "--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging verbosity."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.getLogger("geneformer_peft").setLevel(args.log_level)
    try:
        return int(args._run(args) or 0)
    except DataError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
