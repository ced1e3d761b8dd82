"""The training data of the shipped checkpoints: a byte-level BPE tokenizer and the batches.

Offline (see :mod:`lynx_compile.eval.corpora`): the training split of the running interpreter's
stdlib ``.py`` files and generated arithmetic lines. The tokenizer splits digits into single-digit
tokens and gives every newline its own token, so prompts that end at a newline or at ``=``
tokenize exactly as they did in training.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lynx_compile.eval import corpora
from lynx_compile.eval.tasks import encode


CONTEXT = 256
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"  # also the BOS token: it starts every document and arithmetic sequence
PAD = "<|pad|>"
CODE_SEQS_PER_BATCH = 12  # code windows per optimizer step
ARITH_SEQS_PER_BATCH = 8  # packed arithmetic sequences per optimizer step (60/40 by sequences)
TOKENIZER_ARITH_LINES = 50_000
ARITH_PROBLEMS_PER_SEQ = 48  # enough to fill CONTEXT: a line is at least 6 tokens ("1+2=3\n")
EVAL_CODE_WINDOWS = 200
EVAL_ARITH_SEQS = 48


def train_tokenizer(seed: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE over the training split; digits and newlines are always single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = corpora.code_texts("train") + corpora.arith_lines("train", TOKENIZER_ARITH_LINES, seed)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, add_bos_token=True,
        padding_side="left", model_max_length=CONTEXT)


def code_stream(tokenizer, split: str) -> torch.Tensor:
    """All files of a code split as one token stream, each file preceded by EOS."""
    ids = []
    for file_ids in encode(tokenizer, corpora.code_texts(split)):
        ids.append(tokenizer.eos_token_id)
        ids.extend(file_ids)
    return torch.tensor(ids, dtype=torch.long)


def pack_arith(tokenizer, problems: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """EOS followed by ``prompt answer \\n`` lines, cut to CONTEXT; also marks answer tokens.

    Prompt and answer are encoded separately, exactly as an evaluation prompt is.
    """
    encoded = encode(tokenizer, [text for prompt, answer in problems for text in (prompt, answer + "\n")])
    ids, is_answer = [tokenizer.eos_token_id], [False]
    for prompt_ids, answer_ids in zip(encoded[::2], encoded[1::2]):
        ids += prompt_ids + answer_ids
        is_answer += [False] * len(prompt_ids) + [True] * len(answer_ids)
    if len(ids) < CONTEXT:
        raise ValueError(f"{len(problems)} problems make only {len(ids)} tokens")
    return ids[:CONTEXT], is_answer[:CONTEXT]


class TrainBatches:
    """Seeded training batches: random code windows plus packed arithmetic sequences."""

    def __init__(self, tokenizer, seed: int, code_seqs: int = CODE_SEQS_PER_BATCH,
                 arith_seqs: int = ARITH_SEQS_PER_BATCH):
        self.tokenizer = tokenizer
        self.code_seqs, self.arith_seqs = code_seqs, arith_seqs
        self.code = code_stream(tokenizer, "train")
        self.generator = torch.Generator().manual_seed(seed)
        self.arith = corpora.arith_stream("train", seed)

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.code) - CONTEXT, (self.code_seqs,), generator=self.generator)
        code = [self.code[s:s + CONTEXT] for s in starts.tolist()]
        arith = [torch.tensor(pack_arith(self.tokenizer, [next(self.arith) for _ in range(ARITH_PROBLEMS_PER_SEQ)])[0])
                 for _ in range(self.arith_seqs)]
        return torch.stack(code + arith)


def heldout_code_windows(tokenizer, count: int = EVAL_CODE_WINDOWS) -> torch.Tensor:
    """``count`` non-overlapping windows spread evenly over the held-out code stream."""
    stream = code_stream(tokenizer, "heldout")
    count = min(count, len(stream) // CONTEXT)
    stride = len(stream) // count
    return torch.stack([stream[i * stride:i * stride + CONTEXT] for i in range(count)])


def heldout_arith_sequences(tokenizer, count: int = EVAL_ARITH_SEQS) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` packed held-out arithmetic sequences and their answer-token mask."""
    problems = corpora.arith_problems("heldout", count * ARITH_PROBLEMS_PER_SEQ, seed=1)
    packed = [pack_arith(tokenizer, problems[i:i + ARITH_PROBLEMS_PER_SEQ])
              for i in range(0, len(problems), ARITH_PROBLEMS_PER_SEQ)]
    return torch.tensor([ids for ids, _ in packed]), torch.tensor([mask for _, mask in packed])
