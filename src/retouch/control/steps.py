"""Step and depth options: the one reading of "a count or a fraction" every editor option uses.

An ``int`` is a count (of steps, or a step / block index counted from the noisiest step / the first block);
a ``float`` is a fraction in ``[0, 1]`` of the total, rounded to the nearest count: ``0.0`` is none / the
first, ``1.0`` all / past the last. ``1`` (int) and ``1.0`` (float) therefore differ: one step versus every
step. A float above 1, a negative value or a bool is refused with the option's name.

(Before this module, MasaCtrl's and value replay's options read a float ``>= 1`` as an index, so ``1.0`` meant
step 1; no shipped preset or default passed such a value, so every preset keeps its step counts.)
"""

from __future__ import annotations

__all__ = ["check_steps", "count_of", "to_steps"]


def check_steps(value: float | int, label: str) -> None:
    """Refuse what is neither an int count ``>= 0`` nor a float fraction in ``[0, 1]``; ``label`` names the
    option in the error. Editor options run this when they are built (:mod:`retouch.control.options`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{label} must be a step count or a fraction in [0, 1], got {value!r}")
    if isinstance(value, float) and value > 1:
        raise ValueError(f"{label} as a fraction must be in [0, 1], got {value} (an int is a count)")


def count_of(value: float | int, total: int) -> int:
    """An already checked ``value`` (:func:`check_steps`) as a count of ``total``."""
    return int(round(value * total)) if isinstance(value, float) else int(value)


def to_steps(value: float | int, total: int, label: str) -> int:
    """``value`` (an int count, or a float fraction in [0, 1] of ``total``) as a count; ``label`` names the
    option in the error."""
    check_steps(value, label)
    return count_of(value, total)
