"""Calibration observers: streaming per-block range estimators, registered by name.

``get_observer(name, args, **options)`` gives a fresh observer; ``update(x)`` folds a batch,
``range()`` gives per-block ``(xmin, xmax)`` for ``lowbit.core.quantize.quantize``. See
docs/observers.md for which to use when.
"""

from lowbit.observers.base import OBSERVERS, Batch, Observer, get_observer, observed_range, register_observer
from lowbit.observers.histogram import BlockHistogram, StreamingObserver
from lowbit.observers.kl import KLObserver
from lowbit.observers.minmax import MinMaxObserver
from lowbit.observers.moving_average import MovingAverageObserver
from lowbit.observers.mse import MSEObserver
from lowbit.observers.percentile import PercentileObserver

__all__ = [
    "OBSERVERS", "Batch", "BlockHistogram", "KLObserver", "MSEObserver", "MinMaxObserver",
    "MovingAverageObserver", "Observer", "PercentileObserver", "StreamingObserver",
    "get_observer", "observed_range", "register_observer",
]
