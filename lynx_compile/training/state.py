"""Resumable training state: the fp32 model, the optimizer and the log of every leg so far.

Training a checkpoint to competence takes more CPU time than one session has, so it runs in legs.
A leg saves its state every few minutes, when it is stopped (SIGINT/SIGTERM) and when it ends;
the next leg (``--resume``) continues from the last save with the optimizer's moments intact.

Layout of a state directory (kept out of git: the default is ``build/training/<preset>``)::

    STATE/latest/model.safetensors, config.json   the fp32 weights (save_pretrained)
    STATE/latest/tokenizer.json, ...              the tokenizer the model was trained with
    STATE/latest/trainer.pt                       optimizer state, counters, loss curve, legs

A save is written beside ``latest`` and renamed into place; for the instant between moving the
previous save aside (``latest.old``) and renaming the new one in, the previous save is what
:func:`exists` and :func:`load` find. So a kill during a save loses at most the minutes since the
previous save, never the state.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import transformers

LATEST = "latest"
PREVIOUS = f"{LATEST}.old"
TRAINER_FILE = "trainer.pt"


@dataclasses.dataclass
class Progress:
    """Counters and logs that run across legs."""

    preset: str
    seed: int
    step: int = 0  # optimizer steps over all legs
    tokens: int = 0  # training tokens over all legs
    curve: list = dataclasses.field(default_factory=list)  # [step, mean train CE] every LOG_EVERY steps
    legs: list = dataclasses.field(default_factory=list)  # one dict per leg (see loop.train)


def _saved(state_dir: Path) -> Path | None:
    """The complete save to read: ``latest``, or ``latest.old`` when a save was cut between renames."""
    for name in (LATEST, PREVIOUS):
        if (Path(state_dir) / name / TRAINER_FILE).is_file():
            return Path(state_dir) / name
    return None


def exists(state_dir: Path) -> bool:
    return _saved(state_dir) is not None


def save(state_dir: Path, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer,
         progress: Progress) -> Path:
    """Write the state to ``state_dir/latest`` (see the module docstring for why it is never lost)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    latest, staging, old = state_dir / LATEST, state_dir / f"{LATEST}.tmp", state_dir / PREVIOUS
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)  # the model is trained in fp32: saved as it is
    tokenizer.save_pretrained(staging)
    torch.save({"optimizer": optimizer.state_dict(), "progress": dataclasses.asdict(progress)},
               staging / TRAINER_FILE)
    if latest.exists():  # else `old` may hold the only complete save (a cut save): keep it until now
        shutil.rmtree(old, ignore_errors=True)
        os.replace(latest, old)
    os.replace(staging, latest)
    shutil.rmtree(old, ignore_errors=True)
    return latest


def load(state_dir: Path, experts_implementation: str
         ) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase, dict, Progress]:
    """The model (fp32), tokenizer, optimizer state dict and progress of the last save.

    Raises FileNotFoundError naming the directory when there is no saved state in it.
    """
    latest = _saved(state_dir)
    if latest is None:
        expected = Path(state_dir) / LATEST / TRAINER_FILE
        raise FileNotFoundError(f"no training state in {state_dir} (expected {expected}); "
                                "start a first leg without --resume, or pass the --state of an earlier run")
    model = transformers.AutoModelForCausalLM.from_pretrained(latest, dtype=torch.float32,
                                                              experts_implementation=experts_implementation)
    model.config.output_router_logits = True
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest)
    saved = torch.load(latest / TRAINER_FILE, weights_only=True)
    return model, tokenizer, saved["optimizer"], Progress(**saved["progress"])
