"""Which labels an analysis uses: human, simulated, or both (and never the planted gold)."""

from __future__ import annotations

import dataclasses

import pandas as pd


@dataclasses.dataclass(frozen=True)
class LabelSelection:
    """Which labels an analysis uses, with the counts behind the choice.

    ``include_simulated=None`` (the default everywhere) means: human labels only, unless the
    database holds no human labels, in which case the simulated ones.  Simulated and human
    labels are only mixed when asked for explicitly (``include_simulated=True``).
    """

    human: int
    simulated: int
    include_simulated: bool

    @classmethod
    def resolve(cls, human: int, simulated: int, include_simulated: bool | None):
        use = include_simulated if include_simulated is not None else human == 0
        return cls(human, simulated, bool(use))

    def describe(self) -> str:
        counts = f"judgments: {self.human} human, {self.simulated} simulated"
        if not self.include_simulated or self.simulated == 0:
            return f"{counts} -> using the {self.human} human only"
        if self.human == 0:
            return f"{counts} -> using the {self.simulated} simulated (no human labels yet)"
        return f"{counts} -> MIXING human and simulated as asked ({self.used} in all)"

    @property
    def left_out(self) -> int:
        """Simulated labels the selection leaves out."""
        return 0 if self.include_simulated else self.simulated

    @property
    def used(self) -> int:
        return self.human + (self.simulated if self.include_simulated else 0)


def without_gold(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop planted gold items (rows whose ``gold`` column is true), if the column exists."""
    return frame[~frame["gold"].astype(bool)] if "gold" in frame.columns else frame
