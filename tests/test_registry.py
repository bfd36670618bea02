"""The named registries (formats, observers, kernels, bundled models): a name taken twice is an
error, and an unknown name is a ConfigError listing the known ones."""

from dataclasses import replace

import pytest

from lowbit.core.formats import FORMATS, NumberFormat, get_format, register_format
from lowbit.errors import ConfigError
from lowbit.models.bundled import BUNDLED, register as register_bundled
from lowbit.nn.kernels import KERNELS, DequantKernel, get_kernel, register_kernel
from lowbit.observers import OBSERVERS, MinMaxObserver, get_observer, register_observer

# (registry, its register function, a taken name, a second entry under that name)
SAME_NAME_TWICE = [
    (FORMATS, register_format, "int4", NumberFormat("int4", 3, "int")),
    (OBSERVERS, register_observer, "minmax", type("Other", (MinMaxObserver,), {})),
    (KERNELS, register_kernel, "dequant", type("Other", (DequantKernel,), {})),
    (BUNDLED, register_bundled, "smollm2-135m", replace(BUNDLED["smollm2-135m"], note="other")),
]


@pytest.mark.parametrize(
    "registry, register, name, second", SAME_NAME_TWICE,
    ids=["format", "observer", "kernel", "bundled model"],
)
def test_a_name_registered_twice_is_refused(registry, register, name, second):
    first = registry[name]
    with pytest.raises(ValueError, match=f"{name!r} is registered twice"):
        register(second)
    assert registry[name] is first


@pytest.mark.parametrize(
    "lookup, message",
    [
        (lambda: get_format("int9"), "unknown number format 'int9'; available: .*nf4"),
        (lambda: get_observer("minmaxx", None), "unknown observer 'minmaxx'; available: .*minmax"),
        (lambda: get_kernel("marlin"), "unknown kernel 'marlin'; available: .*dequant"),
        (lambda: BUNDLED["smollm3"], "unknown bundled model 'smollm3'; available: gemma3-270m, smollm2"),
    ],
)
def test_unknown_names_list_the_known_ones(lookup, message):
    with pytest.raises(ConfigError, match=message):
        lookup()
