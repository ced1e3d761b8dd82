"""Where the commands find a checkpoint: a shipped one by name, or any local transformers directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = ("coarse", "fine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype choices


def resolve_checkpoint(name_or_path: str) -> Path:
    """A shipped checkpoint's name (``coarse``, ``fine``) or a local checkpoint directory.

    Raises FileNotFoundError naming it when it is neither."""
    path = CHECKPOINTS / name_or_path if name_or_path in SHIPPED else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither a shipped checkpoint {SHIPPED} nor a directory "
                                f"holding a transformers checkpoint (config.json not found in {path})")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (required) and --dtype, as every command taking one checkpoint spells them."""
    parser.add_argument("--checkpoint", required=True,
                        help="a shipped checkpoint's name (coarse, fine) or a local HF MoE checkpoint directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def load_from_args(cli: argparse.ArgumentParser, args: argparse.Namespace):
    """(path, model in eval mode) for --checkpoint / --dtype; a bad checkpoint is a usage error."""
    import transformers

    try:
        path = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as error:
        cli.error(str(error))
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
