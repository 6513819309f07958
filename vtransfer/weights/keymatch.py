"""One way to say how a state dict fails to match a model: missing, unexpected and mis-shaped keys."""

from __future__ import annotations

MAX_LISTED = 10


def listed(items: list[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` items joined by commas, then ``... and N more``."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", ... and {more} more" if more > 0 else "")


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = MAX_LISTED) -> list[str]:
    """Sentences naming each kind of mismatch that occurred (empty when everything matches)."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {listed(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected, limit)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {listed(mismatched, limit)}")
    return problems


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def state_dict_problems(expected, found, limit: int = MAX_LISTED) -> list[str]:
    """:func:`key_problems` of the tensors ``found`` against ``expected`` (name -> tensor or shape), in ``expected``'s order."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k}: file {_shape(found[k])} vs model {_shape(expected[k])}"
                  for k in expected if k in found and _shape(found[k]) != _shape(expected[k])]
    return key_problems(missing, unexpected, mismatched, limit)
