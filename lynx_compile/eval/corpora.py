"""Offline corpora for training and evaluating the shipped MoE checkpoints.

Two sources, both available on any machine without network access:

* **Code**: the ``.py`` files of the running interpreter's standard library. The split is by
  file: every file of a top-level module or package named in :data:`HELD_OUT_MODULES` is
  held out and never trained on; all other eligible files are training data.
* **Arithmetic**: generated problems such as ``123+456=579`` (addition, subtraction,
  multiplication). A problem ``(a, op, b)`` belongs to the held-out split when a hash of it
  falls in a fixed bucket, so the splits are disjoint for every seed and size.

Paths are always relative to the stdlib root (POSIX separators) and every listing is sorted,
so results are deterministic for a given interpreter. Note that the stdlib differs slightly
between Python versions, so the code corpus does too.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Top-level stdlib modules/packages that are never trained on (all present in Python 3.10-3.12).
HELD_OUT_MODULES: tuple[str, ...] = (
    "bisect", "calendar", "colorsys", "csv", "dataclasses", "difflib", "fnmatch", "fractions",
    "getopt", "graphlib", "heapq", "ipaddress", "json", "pprint", "queue", "sched", "shlex",
    "statistics", "string", "textwrap", "zipfile",
)

# Directory names whose files are never part of the corpus: tests, the IDE, installed packages,
# bytecode caches, and the build configuration directory (``config-3.x-<platform>``).
_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})
_EXCLUDED_DIR_PREFIXES = ("config-",)
# Generated at build time; holds this machine's install paths rather than real source.
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
MAX_FILE_BYTES = 200_000
MIN_NEXT_LINE_CHARS = 8

SPLITS = ("train", "heldout")

ARITH_OPS = ("+", "-", "*")
# Largest operand digit counts: (a, b) for each operator.
ARITH_MAX_DIGITS = {"+": (3, 3), "-": (3, 3), "*": (2, 2)}
# One problem in ARITH_HELDOUT_BUCKETS is held out.
ARITH_HELDOUT_BUCKETS = 10


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ----------------------------------------------------------------------------- code corpus


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _eligible(relative: Path) -> bool:
    *dirs, name = relative.parts
    if any(d in _EXCLUDED_DIRS or d.startswith(_EXCLUDED_DIR_PREFIXES) for d in dirs):
        return False
    return not name.startswith(_EXCLUDED_FILE_PREFIXES)


def _read_utf8(path: Path) -> str | None:
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def top_level_module(relative_path: str) -> str:
    """``"json/decoder.py"`` -> ``"json"``; ``"heapq.py"`` -> ``"heapq"``."""
    first = relative_path.split("/", 1)[0]
    return first.removesuffix(".py")


@functools.cache
def _code_corpus() -> dict[str, tuple[tuple[str, str], ...]]:
    """Split -> sorted ``(relative path, text)`` pairs. Read once per process."""
    root = stdlib_root()
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not _eligible(relative):
            continue
        text = _read_utf8(path)
        if text is None or not text.strip():
            continue
        name = relative.as_posix()
        split = "heldout" if top_level_module(name) in HELD_OUT_MODULES else "train"
        splits[split].append((name, text))
    return {split: tuple(files) for split, files in splits.items()}


def code_files(split: str) -> list[str]:
    """Sorted stdlib-relative paths of the code files in ``split`` ("train" or "heldout")."""
    _check_split(split)
    return [name for name, _ in _code_corpus()[split]]


def code_texts(split: str) -> list[str]:
    """The texts of :func:`code_files` ``(split)``, in the same order."""
    _check_split(split)
    return [text for _, text in _code_corpus()[split]]


def code_token_documents() -> list[str]:
    """Held-out code texts, for per-token loss / perplexity evaluation."""
    return code_texts("heldout")


def code_line_problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` next-line completion problems from held-out files.

    Each is ``(prefix, next_line)``: ``prefix`` is a file's text from its start up to and
    including a newline; ``next_line`` is the following line without its newline or trailing
    whitespace (indentation kept), with at least ``MIN_NEXT_LINE_CHARS`` non-space characters.
    Problems are drawn without replacement, uniformly over all such lines, seeded by ``seed``.
    """
    candidates = []  # (file index, character offset of the line, line)
    texts = code_texts("heldout")
    for index, text in enumerate(texts):
        offset = 0
        for line in text.splitlines(keepends=True):
            stripped = line.rstrip()
            if offset > 0 and len("".join(stripped.split())) >= MIN_NEXT_LINE_CHARS:
                candidates.append((index, offset, stripped))
            offset += len(line)
    if n > len(candidates):
        raise ValueError(f"asked for {n} problems; held-out code has {len(candidates)} lines")
    chosen = random.Random(seed).sample(candidates, n)
    return [(texts[index][:offset], line) for index, offset, line in chosen]


# ----------------------------------------------------------------------------- arithmetic


def arith_split(a: int, op: str, b: int) -> str:
    """The split a problem belongs to, from a hash of the problem alone."""
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % ARITH_HELDOUT_BUCKETS == 0 else "train"


def _operand(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in ``1..max_digits``, so short problems appear too."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arith_stream(split: str, seed: int) -> Iterator[tuple[str, str]]:
    """An endless seeded stream of ``(prompt, answer)`` problems of ``split`` (may repeat).

    ``prompt`` is like ``"123+456="``, ``answer`` the decimal digits of the result.
    Subtraction always has ``a >= b``, so every answer is a non-negative number.
    """
    _check_split(split)
    rng = random.Random(seed)
    while True:
        op = rng.choice(ARITH_OPS)
        max_a, max_b = ARITH_MAX_DIGITS[op]
        a, b = _operand(rng, max_a), _operand(rng, max_b)
        if op == "-" and a < b:
            a, b = b, a
        if arith_split(a, op, b) == split:
            yield f"{a}{op}{b}=", str(_answer(a, op, b))


def arith_problems(split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` problems of ``split``, in a seeded order."""
    seen: dict[str, str] = {}
    stream = arith_stream(split, seed)
    for _ in range(100 * n + 1000):
        prompt, answer = next(stream)
        seen.setdefault(prompt, answer)
        if len(seen) == n:
            return list(seen.items())
    raise ValueError(f"could not draw {n} distinct {split} problems")


def arith_lines(split: str, n: int, seed: int) -> list[str]:
    """``n`` problems of ``split`` as text lines ``"123+456=579"`` (may repeat), for training."""
    stream = arith_stream(split, seed)
    return ["".join(next(stream)) for _ in range(n)]
