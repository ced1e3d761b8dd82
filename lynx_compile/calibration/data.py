"""Default calibration data: teacher-forced decode windows of code from the training split.

The windows are cut exactly as the eval's `code-token` task cuts its held-out ones
(`eval/tasks.py:code_token_windows`), but from the *training* split of the code corpus
(`eval/corpora.py`: files of stdlib modules that are not held out), every `FILE_STRIDE`-th file,
so a plan is never calibrated on the data `lynx-compile eval` then scores it on.
"""

from __future__ import annotations

import torch

from ..eval import corpora, tasks

FILE_STRIDE = 20  # 1 training file in 20: ~32 files, tokenized in about a second


def default_batches(tokenizer, num_batches: int, batch_size: int, prefix: int = tasks.CODE_TOKEN_PREFIX,
                    steps: int = tasks.CODE_TOKEN_STEPS) -> list[torch.Tensor]:
    """num_batches (batch_size, prefix + steps) int64 windows: prefix tokens of prefill, then
    `steps` decode steps."""
    texts = corpora.code_texts("train")[::FILE_STRIDE]
    windows = tasks.code_token_windows(tokenizer, num_batches * batch_size * steps, prefix, steps, texts=texts)
    windows = windows[:num_batches * batch_size, :prefix + steps]
    return list(windows.split(batch_size))
