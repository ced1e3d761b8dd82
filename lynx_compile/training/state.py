"""Resumable training state: the fp32 model, the optimizer and the log of every leg so far.

Training a checkpoint to competence takes more CPU time than one session has, so it runs in legs.
A leg saves its state every few minutes, when it is stopped (SIGINT/SIGTERM) and when it ends;
the next leg (``--resume``) continues from the last save with the optimizer's moments intact.

Layout of a state directory (kept out of git: the default is ``build/training/<preset>``)::

    STATE/latest/model.safetensors, config.json   the fp32 weights (save_pretrained)
    STATE/latest/tokenizer.json, ...              the tokenizer the model was trained with
    STATE/latest/trainer.pt                       optimizer state, counters, loss curve, legs

``latest`` is replaced atomically (written beside it, then renamed), so a kill during a save loses
at most the minutes since the previous save, never the state.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import transformers

LATEST = "latest"
TRAINER_FILE = "trainer.pt"


@dataclasses.dataclass
class Progress:
    """Counters and logs that run across legs."""

    preset: str
    seed: int
    step: int = 0  # optimizer steps over all legs
    tokens: int = 0  # training tokens over all legs
    curve: list = dataclasses.field(default_factory=list)  # [step, mean train CE] every LOG_EVERY steps
    legs: list = dataclasses.field(default_factory=list)  # one dict per leg (see train_checkpoint.train)


def exists(state_dir: Path) -> bool:
    return (Path(state_dir) / LATEST / TRAINER_FILE).is_file()


def save(state_dir: Path, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer,
         progress: Progress) -> Path:
    """Write the state to ``state_dir/latest`` atomically; return that path."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    latest, staging, old = state_dir / LATEST, state_dir / f"{LATEST}.tmp", state_dir / f"{LATEST}.old"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)  # the model is trained in fp32: saved as it is
    tokenizer.save_pretrained(staging)
    torch.save({"optimizer": optimizer.state_dict(), "progress": dataclasses.asdict(progress)},
               staging / TRAINER_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if latest.exists():
        os.replace(latest, old)
    os.replace(staging, latest)
    shutil.rmtree(old, ignore_errors=True)
    return latest


def load(state_dir: Path, experts_implementation: str
         ) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase, dict, Progress]:
    """The model (fp32), tokenizer, optimizer state dict and progress of the last save.

    Raises FileNotFoundError naming the directory when there is no saved state in it.
    """
    latest = Path(state_dir) / LATEST
    if not (latest / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"no training state in {state_dir} (expected {latest / TRAINER_FILE}); "
                                "start a first leg without --resume, or pass the --state of an earlier run")
    model = transformers.AutoModelForCausalLM.from_pretrained(latest, dtype=torch.float32,
                                                              experts_implementation=experts_implementation)
    model.config.output_router_logits = True
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest)
    saved = torch.load(latest / TRAINER_FILE, weights_only=True)
    return model, tokenizer, saved["optimizer"], Progress(**saved["progress"])
