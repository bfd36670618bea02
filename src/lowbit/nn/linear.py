"""QuantizedLinear: an nn.Linear replacement that stores packed codes.

The canonical ``QuantizedTensor`` fields are buffers (``qdata``, ``scale``, ``zero_point``,
``group_index``), so ``state_dict`` holds exactly what is saved. The compute path is a kernel
from ``lowbit.nn.kernels``, chosen by name (``kernel=`` or ``set_kernel``), never by a hidden
hardware check. What the kernel prepares lives in non-persistent buffers named
``prepared_<field>``: it follows ``.to(device)``, stays out of ``state_dict``, and is rebuilt
after ``load_state_dict``.

A layer may carry activation settings (``input_activations``, ``output_activations``: the
QuantArgs of a ``Scheme``). lowbit does not execute activation quantization yet, so such a layer
refuses to run (``ActivationQuantizationError``) except inside ``weights_only(model)``, where it
computes with quantized weights and float activations (the calibration pipeline uses that to feed
the next layer).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.core.args import QuantArgs
from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.nn.kernels import Kernel, KernelUnsupportedError, get_kernel

logger = logging.getLogger(__name__)

PREPARED_PREFIX = "prepared_"
CANONICAL = QuantizedTensor.STORED_FIELDS
ACTIVATION_FIELDS = ("input_activations", "output_activations")


class ActivationQuantizationError(LowbitError):
    """A model quantizes activations, which lowbit cannot execute yet."""


class QuantizedLinear(nn.Module):
    def __init__(
        self, qweight: QuantizedTensor, bias: torch.Tensor | None = None, kernel: str = "dequant",
        input_activations: QuantArgs | None = None, output_activations: QuantArgs | None = None,
    ):
        super().__init__()
        self.input_activations = input_activations
        self.output_activations = output_activations
        self.weights_only = False
        self.out_features, self.in_features = qweight.shape
        self.format_name = qweight.format.name
        self.block_size = tuple(qweight.block_size)
        self.scale_format = None if qweight.scale_format is None else qweight.scale_format.name
        self.super_block = qweight.super_block
        self.weight_dtype = qweight.dtype
        for name in CANONICAL:
            self.register_buffer(name, getattr(qweight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._kernel: Kernel | None = None
        self._sources: dict[str, str] = {}  # prepared field -> buffer name
        self._settings: dict = {}
        self.set_kernel(kernel)
        # load_state_dict copies new codes into the buffers: derive the kernel's layout again.
        self.register_load_state_dict_post_hook(_prepare_again)

    @property
    def qweight(self) -> QuantizedTensor:
        return QuantizedTensor(
            self.qdata, self.scale, self.zero_point, get_format(self.format_name),
            self.block_size, (self.out_features, self.in_features), self.weight_dtype,
            self.group_index, self.super_scale, self.super_min,
            None if self.scale_format is None else get_format(self.scale_format), self.super_block,
        )

    @property
    def kernel(self) -> str:
        return self._kernel.name

    def kernel_support(self, name: str) -> str | None:
        """None if kernel ``name`` can run this layer where its weight is, else the reason."""
        return get_kernel(name).supports(self.qweight, self.qdata.device)

    def set_kernel(self, name: str) -> None:
        """Compute with kernel ``name`` from now on (repacks the weight for it once)."""
        kernel = get_kernel(name)
        reason = self.kernel_support(name)
        if reason is not None:
            raise KernelUnsupportedError(
                f"kernel {name!r} cannot run this layer ({self.format_name}, blocks "
                f"{self.block_size}, {self.out_features}x{self.in_features}): {reason}; use "
                "kernel 'dequant', which runs every format"
            )
        prepared = kernel.prepare(self.qweight)
        for buffer in set(self._sources.values()) - set(CANONICAL):
            del self._buffers[buffer]
        sources, settings = {}, {}
        for f in dataclasses.fields(prepared):
            value = getattr(prepared, f.name)
            if not (value is None or isinstance(value, torch.Tensor)):
                settings[f.name] = value
                continue
            # A field that is a canonical buffer itself (dequant's qdata) refers to it, so that
            # .to(device) moves one tensor, not two copies.
            shared = next((c for c in CANONICAL if value is not None and value is self._buffers[c]),
                          None)
            sources[f.name] = shared or PREPARED_PREFIX + f.name
            if shared is None:
                self.register_buffer(sources[f.name], value, persistent=False)
        self._kernel, self._sources, self._settings = kernel, sources, settings
        logger.debug("%s: kernel %s", self.extra_repr(), name)

    def prepared(self):
        """The kernel's prepared record, rebuilt from the (possibly moved) buffers."""
        buffers = self._buffers
        return self._kernel.Prepared(
            **self._settings, **{f: buffers[b] for f, b in self._sources.items()}
        )

    def metadata(self) -> dict:
        """What the saved config records of this layer: the weight's layout and activations."""
        meta = self.qweight.metadata()
        for name in ACTIVATION_FIELDS:
            args = getattr(self, name)
            if args is not None:
                meta[name] = args.to_dict()
        return meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weights_only and (self.input_activations or self.output_activations):
            acts = self.input_activations or self.output_activations
            raise ActivationQuantizationError(
                f"this model's scheme quantizes activations ({acts.describe()}), which lowbit "
                "cannot run yet; quantize with a weight-only scheme (e.g. W8A16, W4A16) to "
                "evaluate it here"
            )
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return self._kernel.forward(x, self.prepared(), bias)

    def extra_repr(self) -> str:
        acts = "".join(f", {n}={getattr(self, n).describe()}" for n in ACTIVATION_FIELDS if getattr(self, n))
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format_name}, block_size={self.block_size}, "
            f"bias={self.bias is not None}, kernel={self.kernel if self._kernel else None}{acts}"
        )


@contextmanager
def weights_only(model: nn.Module) -> Iterator[None]:
    """Inside the block, QuantizedLinear layers with activation settings compute with float
    activations (quantized weights only)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    before = [m.weights_only for m in layers]
    try:
        for m in layers:
            m.weights_only = True
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.weights_only = b


def _prepare_again(module: QuantizedLinear, incompatible_keys) -> None:
    module.set_kernel(module.kernel)


@dataclass
class KernelChoice:
    """Which kernel each QuantizedLinear of a model uses, and why a layer fell back."""

    kernels: dict[str, str] = field(default_factory=dict)
    """layer name -> kernel name"""
    reasons: dict[str, str] = field(default_factory=dict)
    """layer name -> why the requested kernel could not run it"""

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.kernels.values()))


def set_kernel(model: nn.Module, name: str, fallback: str | None = "dequant") -> KernelChoice:
    """Use kernel ``name`` on every QuantizedLinear of ``model`` that it supports and
    ``fallback`` on the others (``fallback=None``: raise instead). Logs the counts."""
    get_kernel(name)  # an unknown name fails before any layer changes
    choice = KernelChoice()
    for layer_name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        reason = module.kernel_support(name)
        if reason is not None and fallback is not None:
            choice.reasons[layer_name] = reason
            module.set_kernel(fallback)
        else:
            module.set_kernel(name)  # raises with the reason when fallback is None
        choice.kernels[layer_name] = module.kernel
    counts = ", ".join(f"{k}: {n}" for k, n in choice.counts().items()) or "no QuantizedLinear"
    logger.info("kernel %r requested; layers per kernel: %s", name, counts)
    for reason, n in Counter(choice.reasons.values()).items():
        logger.info("%d layer(s) use %r because %s", n, fallback, reason)
    return choice
