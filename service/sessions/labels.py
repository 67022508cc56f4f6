"""Client labels to model slots: the i-th distinct label of a session takes slot i."""

from __future__ import annotations

Label = str | int


class TooManyLabels(ValueError):
    """One more distinct label than the model has slots."""

    def __init__(self, label: Label, in_use: list[Label]) -> None:
        super().__init__(
            f"label {label!r} would be label {len(in_use) + 1} of a {len(in_use)}-way model; labels in use: {in_use}"
        )
        self.label, self.in_use = label, in_use


def label_key(label: Label) -> str:
    """A hashable identity that keeps 1 and "1" apart, as JSON does (the request schema keeps bools out)."""
    return f"i:{label}" if isinstance(label, int) else f"s:{label}"


def slot_of(labels: list[Label], label: Label) -> int | None:
    """The slot ``label`` holds, or None when it has none yet."""
    key = label_key(label)
    for slot, existing in enumerate(labels):
        if label_key(existing) == key:
            return slot
    return None


def assign(labels: list[Label], label: Label, num_ways: int) -> tuple[int, list[Label]]:
    """The slot for ``label`` and the labels after it; raises TooManyLabels past ``num_ways``."""
    slot = slot_of(labels, label)
    if slot is not None:
        return slot, labels
    if len(labels) >= num_ways:
        raise TooManyLabels(label, labels)
    return len(labels), [*labels, label]
