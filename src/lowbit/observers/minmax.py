"""Min-max: each block's range is the smallest and largest value seen in any batch."""

from __future__ import annotations

from lowbit.core.args import QuantArgs
from lowbit.observers.base import Batch, Observer, register_observer


@register_observer
class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self, args: QuantArgs):
        super().__init__(args)

    def _fold(self, batch: Batch) -> None:
        pass  # the base class keeps the running extremes

    def _range(self):
        return self.xmin, self.xmax
