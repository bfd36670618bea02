"""Moving average: an exponential moving average of each batch's per-block min and max.

    m_1 = batch_1,   m_t = momentum * m_{t-1} + (1 - momentum) * batch_t

for the min and the max separately. A single outlier batch then moves the range by only
``1 - momentum`` of its excess (the min-max observer keeps it for ever). With momentum 0.9 the
range forgets a batch's contribution with a half-life of about 6.6 batches.
"""

from __future__ import annotations

from lowbit.core.args import QuantArgs
from lowbit.errors import ConfigError
from lowbit.observers.base import Batch, Observer, register_observer


@register_observer
class MovingAverageObserver(Observer):
    name = "moving_average"

    def __init__(self, args: QuantArgs, momentum: float = 0.9):
        super().__init__(args)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"moving_average momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.average_min = None
        self.average_max = None

    def _fold(self, batch: Batch) -> None:
        if self.average_min is None:
            self.average_min, self.average_max = batch.min, batch.max
            return
        m = self.momentum
        self.average_min = m * self.average_min + (1 - m) * batch.min
        self.average_max = m * self.average_max + (1 - m) * batch.max

    def _range(self):
        return self.average_min, self.average_max

    def _state(self):
        return [self.average_min, self.average_max]
