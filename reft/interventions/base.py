"""The `Intervention` base class and the registry that names interventions.

An intervention is an `nn.Module` that maps hidden states `[..., d] -> [..., d]`. Configs and
checkpoints refer to it by its registered name and constructor arguments, never by a class path, so
loading an adapter can only ever build classes that were registered in this process.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from .._errors import short

_REGISTRY: dict[str, type["Intervention"]] = {}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Intervention(nn.Module):
    """Base class: `forward(h)` maps hidden states `[..., hidden_size] -> [..., hidden_size]`.

    `self.config` is recorded from the constructor's signature: every argument of the subclass's
    `__init__`, defaults applied, a dtype by its name. `make_intervention(self.name, **self.config)`
    then rebuilds the same intervention, which is what adapters on disk store, so the arguments
    must be JSON-friendly values. Subclasses call `super().__init__(hidden_size)`; passing their
    other arguments too, as older subclasses do, changes nothing. The output has the dtype of `h`,
    whatever the dtype of the parameters.
    """

    name: str = ""  # set by @register_intervention

    def __init__(self, hidden_size: int, **config: Any):
        super().__init__()
        if not _is_int(hidden_size) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {short(hidden_size)}")
        if "dropout" in config:
            check_dropout(config["dropout"])
        self.hidden_size = hidden_size
        self.config = _recorded({"hidden_size": hidden_size, **config})  # a subclass's __init__ replaces it

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:  # inherits a constructor that already records
            return
        signature = inspect.signature(init)
        if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            return  # `*args` cannot be rebuilt by keyword: the constructor it delegates to records

        @functools.wraps(init)  # keeps the signature for inspect (recipes check arguments against it)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                bound = None  # let the constructor itself say what is wrong
            if bound is not None and "dropout" in bound.arguments:
                check_dropout(bound.arguments["dropout"])  # before any weight is allocated
            init(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            config = {}
            for key, value in list(bound.arguments.items())[1:]:  # [0] is self
                if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                    config.update(value)
                else:
                    config[key] = value
            # The outermost constructor finishes last: a subclass of a subclass records its own arguments.
            self.config = _recorded(config)

        cls.__init__ = __init__

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the intervention computes in (its first parameter's), float32 if it has none."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args}, params={self.num_parameters():,})"


T = TypeVar("T", bound=type[Intervention])


def register_intervention(name: str) -> Callable[[T], T]:
    """Class decorator: make an `Intervention` subclass buildable by `name` (in configs and adapters)."""

    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Intervention)):
            raise TypeError(f"@register_intervention({name!r}) needs a subclass of reft.Intervention, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"intervention name {name!r} is already registered to {known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_interventions() -> list[str]:
    """The names `make_intervention` accepts, sorted."""
    return sorted(_REGISTRY)


def intervention_class(name: str) -> type[Intervention]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown intervention {short(name)}; registered: {', '.join(registered_interventions())}")
    return _REGISTRY[name]


def make_intervention(name: str, **kwargs: Any) -> Intervention:
    """Build a registered intervention by name: `make_intervention("loreft", hidden_size=576, rank=4)`."""
    return intervention_class(name)(**kwargs)


def activation(name: str | None) -> nn.Module:
    """`None` or `"linear"` is the identity; otherwise one of relu, gelu, silu, tanh, sigmoid."""
    key = "linear" if name is None else name
    if not isinstance(key, str) or key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {short(name)}; valid: None, {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]()


def _recorded(config: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments as `self.config` keeps them: the dtype by its name."""
    if config.get("dtype") is not None:
        config["dtype"] = _dtype_name(config["dtype"])
    return config


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported intervention dtype {short(dtype)}; valid: {', '.join(_DTYPES)}")
    return name


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return _DTYPES[_dtype_name(dtype)]


def check_rank(rank: int, hidden_size: int) -> None:
    if not _is_int(rank) or not 1 <= rank <= hidden_size:
        raise ValueError(f"rank must be an int in 1..{hidden_size} (the hidden size), got {short(rank)}")


def check_dropout(dropout: float) -> None:
    """A dropout probability in [0, 1): 1.0 would zero every edited state, NaN would keep or drop at random."""
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a number in [0, 1), got {short(dropout)}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def orthonormal_init(rank: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A random `[rank, hidden_size]` matrix with orthonormal rows (drawn in float32, then cast)."""
    return nn.init.orthogonal_(torch.empty(rank, hidden_size)).to(dtype)


class OrthonormalRows(nn.Module):
    """A `[rank, d]` matrix R with orthonormal rows (`R Rᵀ = I`), for every value of its parameter.

    Stores only the `rank × d` parameter `weight` and maps it through a reduced QR decomposition
    (signs fixed so that an already orthonormal `weight` maps to itself). Unlike
    `torch.nn.utils.parametrizations.orthogonal`, no `d × d` base is kept beside it. Call it once per
    forward pass and reuse the result for every position.
    """

    def __init__(self, rank: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(orthonormal_init(rank, hidden_size, dtype))

    def forward(self) -> torch.Tensor:
        w = self.weight
        q, r = torch.linalg.qr(w.float().T)  # q: [d, rank], r: [rank, rank]
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
        return (q * sign).T.to(w.dtype)  # [rank, d]
