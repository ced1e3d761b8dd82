"""The evaluation tasks: problems built from the held-out corpora, tokenized for one checkpoint.

* ``arith``: ``"123+456="`` -> greedy continuation up to the newline; exact match of the answer.
* ``code-line``: a held-out file's text up to a newline -> greedy next line; exact match
  (trailing whitespace ignored, indentation kept).
* ``code-token``: held-out code windows decoded teacher-forced, B windows stepping together;
  a problem is one predicted token, correct when the argmax is the next token of the file.

Prompts are built exactly as the training script (``lynx_compile.training.train_checkpoint``)
builds its evaluation prompts, so the two report comparable numbers.
"""

from __future__ import annotations

import dataclasses

import torch

from lynx_compile.eval import corpora

TASKS = ("arith", "code-line", "code-token")

ARITH_MAX_NEW_TOKENS = 8  # the longest answer (999+999, 99*99) is 4 digits plus the newline
CODE_LINE_MAX_NEW_TOKENS = 32  # 2.4% of held-out next lines are longer (median 14 tokens); they count as misses
CODE_TOKEN_PREFIX = 32  # tokens fed by prefill before the teacher-forced decode steps
CODE_TOKEN_STEPS = 16  # decode steps (one predicted token each) per window


@dataclasses.dataclass(frozen=True)
class GenerationProblem:
    """A prompt (token ids, BOS included where the task starts a document) and its expected line."""

    prompt_ids: list[int]
    expected: str


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens.

    Whole files are longer than the model's context on purpose (windows are cut from them later):
    ``verbose=False`` keeps the tokenizer from warning about it."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def newline_id(tokenizer) -> int:
    """The id of the newline token (the shipped tokenizers keep every newline a token of its own)."""
    ids = encode(tokenizer, ["\n"])[0]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits a newline into {len(ids)} tokens; line tasks need one")
    return ids[0]


def arith_problems(tokenizer, count: int) -> list[GenerationProblem]:
    """``count`` distinct held-out arithmetic problems; prompt = BOS + ``"a op b="``."""
    problems = corpora.arith_problems("heldout", count, seed=0)
    prompts = encode(tokenizer, [prompt for prompt, _ in problems])
    return [GenerationProblem([tokenizer.bos_token_id] + ids, answer)
            for ids, (_, answer) in zip(prompts, problems)]


def code_line_problems(tokenizer, count: int, context: int,
                       max_new_tokens: int = CODE_LINE_MAX_NEW_TOKENS) -> list[GenerationProblem]:
    """``count`` held-out next-line problems; the prompt is the file prefix, cut to fit ``context``.

    A prefix that fits starts with BOS, as training documents do; a longer one keeps its tail.
    """
    problems = corpora.code_line_problems(count, seed=0)
    budget = context - max_new_tokens
    out = []
    for ids, (_, line) in zip(encode(tokenizer, [prefix for prefix, _ in problems]), problems):
        prompt = [tokenizer.bos_token_id] + ids if len(ids) < budget else ids[-budget:]
        out.append(GenerationProblem(prompt, line))
    return out


def generation_problems(task: str, tokenizer, count: int, context: int) -> list[GenerationProblem]:
    if task == "arith":
        return arith_problems(tokenizer, count)
    if task == "code-line":
        return code_line_problems(tokenizer, count, context)
    raise ValueError(f"{task!r} is not a generation task; generation tasks are 'arith' and 'code-line'")


def max_new_tokens(task: str) -> int:
    return ARITH_MAX_NEW_TOKENS if task == "arith" else CODE_LINE_MAX_NEW_TOKENS


def is_correct(task: str, output: str, expected: str) -> bool:
    """Exact match: ``arith`` ignores surrounding spaces, ``code-line`` only trailing ones."""
    return (output.strip() if task == "arith" else output.rstrip()) == expected


def code_token_windows(tokenizer, count: int, prefix: int = CODE_TOKEN_PREFIX,
                       steps: int = CODE_TOKEN_STEPS, texts: list[str] | None = None) -> torch.Tensor:
    """(W, prefix + steps + 1) token windows spread evenly over the held-out code files.

    W = ceil(count / steps), so the task has at least ``count`` predicted tokens. Each window
    holds the prefix, the ``steps`` tokens fed one per decode step, and the token after them,
    all from one file (a window starting at a file's start begins with BOS, as in training).
    texts: other code texts to cut the windows from (calibration uses training files).
    """
    width = prefix + steps + 1
    texts = corpora.code_token_documents() if texts is None else texts
    documents = [[tokenizer.bos_token_id] + ids for ids in encode(tokenizer, texts)]
    # Every start that keeps the window inside one document, in corpus order.
    starts = [(d, s) for d, ids in enumerate(documents) for s in range(0, len(ids) - width + 1)]
    windows = -(-count // steps)
    if len(starts) < windows:
        raise ValueError(f"held-out code allows {len(starts)} windows of {width} tokens; {windows} needed")
    stride = len(starts) / windows
    picked = [starts[int(i * stride)] for i in range(windows)]
    return torch.tensor([documents[d][s:s + width] for d, s in picked])
