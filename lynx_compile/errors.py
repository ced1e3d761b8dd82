"""The error a bad option raises, and the value checks that name the key (a leaf module).

Every option of the lynx backend, every policy parameter and every plan field is checked with
these, so a user always reads the same kind of message: the key, the value given, what is valid.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn


def _dynamo_passthrough_base() -> tuple[type, ...]:
    # Dynamo wraps any exception a backend raises in BackendCompilerFailed, except those deriving
    # from ShortenTraceback, which it re-raises untouched. Mixing it in lets a bad `options=` reach
    # the user as the ValueError it is. If a future torch drops the class, we degrade to the wrap.
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - depends on the torch version
        return ()
    return (ShortenTraceback,)


class LynxOptionsError(ValueError, *_dynamo_passthrough_base()):
    """A bad `options=` key or value given to the lynx backend (a ValueError)."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None

    def remove_dynamo_frames(self) -> LynxOptionsError:
        return self


def fail(key: str, value: Any, expected: str) -> NoReturn:
    """Raise LynxOptionsError: "lynx: option 'key' got value; expected ..."."""
    raise LynxOptionsError(f"lynx: option {key!r} got {value!r}; expected {expected}")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


def check_number(key: str, value: Any, *, positive: bool, allow_none: bool = False) -> None:
    """A finite int or float; > 0 when `positive`, else >= 0."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, value, "a finite number" + (" or None" if allow_none else ""))
    if positive and value <= 0:
        fail(key, value, "a number > 0")
    if not positive and value < 0:
        fail(key, value, "a number >= 0")


def check_int(key: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, value, f"an integer >= {minimum}" + (" or None" if allow_none else ""))
