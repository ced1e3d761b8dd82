"""Batched greedy decoding for the evaluation, always through transformers' ``generate()``.

Decode step time is measured inside ``generate()`` itself: a stopping criterion that never stops
notes the time each time a token has been chosen, so the gaps between its calls are decode steps
as a user of ``generate()`` sees them (forward pass plus transformers' per-step bookkeeping).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from lynx_compile.eval.tasks import GenerationProblem, newline_id


class DecodeStepTimer(StoppingCriteria):
    """A stopping criterion that never stops and records the wall time between tokens."""

    def __init__(self) -> None:
        self.step_ms: list[float] = []
        self._last: float | None = None

    def start(self) -> None:
        self._last = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        if self._last is not None:  # the first call follows the prefill, not a decode step
            self.step_ms.append((now - self._last) * 1e3)
        self._last = now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, each sequence right-aligned (decoder-only batching)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def batches(items: list, batch: int) -> Iterator[list]:
    for start in range(0, len(items), batch):
        yield items[start:start + batch]


@torch.no_grad()
def generate_lines(model, tokenizer, problems: list[GenerationProblem], batch: int, max_new_tokens: int,
                   timer: DecodeStepTimer | None = None, progress=None) -> list[str]:
    """Greedy continuation of each prompt through ``model.generate``, cut at its first newline."""
    stop_ids = [newline_id(tokenizer), tokenizer.eos_token_id]
    criteria = StoppingCriteriaList([timer] if timer else [])
    lines = []
    for chunk in batches(problems, batch):
        ids, mask = left_pad([p.prompt_ids for p in chunk], tokenizer.pad_token_id)
        if timer:
            timer.start()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=criteria)
        lines += [tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0]
                  for row in out[:, ids.shape[1]:]]
        if progress is not None:
            progress.update(len(chunk))
    return lines


class ForceTokens(LogitsProcessor):
    """Teacher forcing inside ``generate()``: notes each row's argmax (and, on request, its
    next-token log-probabilities), then forces the true next token."""

    def __init__(self, targets: torch.Tensor, keep_log_probs: bool = False) -> None:
        self.targets = targets  # (B, steps + 1): the tokens generate() must emit, in order
        self.predictions: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] | None = [] if keep_log_probs else None  # (B, V) per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = len(self.predictions)
        self.predictions.append(scores.argmax(-1))
        if self.log_probs is not None:
            self.log_probs.append(torch.log_softmax(scores.float(), dim=-1))
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.targets[:, step:step + 1], 0.0)
        return forced


@torch.no_grad()
def teacher_forced_predictions(model, windows: torch.Tensor, prefix: int, batch: int, pad_id: int,
                               timer: DecodeStepTimer | None = None, progress=None,
                               log_probs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Argmax predictions (W, steps) of the tokens ``windows[:, prefix + 1:]``, decoded teacher-forced.

    The first ``prefix`` tokens go in by prefill; ``generate()`` then emits the window's own
    tokens (forced), so every decode step feeds B windows their true next token together (a
    decode batch) and the argmax before forcing is that step's prediction. The prediction made
    by the prefill is not counted: it is not a decode step. Windows must not contain the EOS
    token after their first position, or ``generate()`` would end that row early.
    """
    steps = windows.shape[1] - prefix - 1
    criteria = StoppingCriteriaList([timer] if timer else [])
    predictions = []
    for chunk in windows.split(batch):
        forcing = ForceTokens(chunk[:, prefix:], keep_log_probs=log_probs is not None)
        if timer:
            timer.start()
        model.generate(input_ids=chunk[:, :prefix], attention_mask=torch.ones_like(chunk[:, :prefix]),
                       max_new_tokens=steps + 1, do_sample=False,
                       logits_processor=LogitsProcessorList([forcing]), stopping_criteria=criteria,
                       pad_token_id=pad_id)
        predictions.append(torch.stack(forcing.predictions[1:], dim=1))
        if log_probs is not None:
            log_probs.append(torch.stack(forcing.log_probs[1:], dim=1))
        if progress is not None:
            progress.update(len(chunk) * steps)
    return torch.cat(predictions)
