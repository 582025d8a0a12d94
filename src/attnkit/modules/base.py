"""BaseAttention, the registry of attention modules, and swapping them inside a model."""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from typing import Callable, TypeVar

from torch import Tensor, nn

from .._checks import tensor

__all__ = ["BaseAttention", "AttentionRegistry", "ATTENTION_REGISTRY", "swap", "SwappableMixin"]

T = TypeVar("T", bound="BaseAttention")


class BaseAttention(ABC, nn.Module):
    """Any attention on split heads: (q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, D]) -> [B, H, Lq, D].

    `mask` is bool, True = attend, broadcastable to [B, H, Lq, Lk]; `bias` is
    additive, broadcastable to [B, H, Lq, Lk] (e.g. an Evoformer pair bias).
    Subclasses keep their constructor arguments as attributes of the same
    name, so `from_config` and `swap` can rebuild them.
    """

    @abstractmethod
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor: ...

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @classmethod
    def from_config(cls: type[T], config, **overrides) -> T:
        """Build from a dataclass config: the fields this class's __init__ takes, then overrides."""
        if not dataclasses.is_dataclass(config) or isinstance(config, type):
            raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
        params = inspect.signature(cls.__init__).parameters
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in params}
        unknown = set(overrides) - set(params)
        if unknown:
            raise TypeError(f"{cls.__name__} takes no argument(s) {sorted(unknown)}; it takes {sorted(p for p in params if p != 'self')}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def check_heads(self, q: Tensor) -> None:
        """Raise if q's head count or head dim differ from the module's."""
        if tensor("q", q).dim() != 4 or q.shape[1] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"{type(self).__name__} expects q [B, {self.num_heads}, L, {self.head_dim}], "
                f"got {list(q.shape)}"
            )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class AttentionRegistry:
    """Name -> BaseAttention subclass. `list()`, `build(name, **kw)`, `register(name)`."""

    def __init__(self) -> None:
        self._classes: dict[str, type[BaseAttention]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: `@ATTENTION_REGISTRY.register("mine")`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"registry name must be a non-empty str, got {name!r}")

        def deco(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, BaseAttention)):
                raise TypeError(f"only BaseAttention subclasses can be registered, got {cls!r}")
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"attention {name!r} is already registered to {self._classes[name].__name__}")
            self._classes[name] = cls
            return cls

        return deco

    def list(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[BaseAttention]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"unknown attention {name!r}; registered: {', '.join(self.list())}") from None

    def build(self, name: str, **kwargs) -> BaseAttention:
        return self.get(name)(**kwargs)

    def name_of(self, module: BaseAttention) -> str | None:
        for n, c in self._classes.items():
            if type(module) is c:
                return n
        return None

    def __contains__(self, name: str) -> bool:
        return name in self._classes


ATTENTION_REGISTRY = AttentionRegistry()


def _rebuild(old: BaseAttention, cls: type[BaseAttention], like: Tensor | None = None) -> BaseAttention:
    """A `cls` with old's dimensions and constructor settings, and every weight that fits.

    The new module takes the device and dtype of old's first parameter/buffer,
    else of `like` (a tensor of the model it goes into).
    """
    params = inspect.signature(cls.__init__).parameters
    if getattr(old, "causal", False) is True and "causal" not in params:
        raise ValueError(f"{type(old).__name__} is causal (causal=True) and {cls.__name__} has no causal setting: "
                         "after the swap queries would see later keys")
    kwargs = {"num_heads": old.num_heads, "head_dim": old.head_dim}
    for p in params:
        # backend is what the kind means (standard = reference, flash = auto): never carried over.
        if p not in ("self", "num_heads", "head_dim", "backend") and hasattr(old, p):
            kwargs[p] = getattr(old, p)
    new = cls(**kwargs)
    own = new.state_dict()
    fitting = {k: v for k, v in old.state_dict().items() if k in own and own[k].shape == v.shape}
    new.load_state_dict(fitting, strict=False)
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is None:
        ref = like
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    new.train(old.training)
    return new


def swap(model: nn.Module, kind: str, name: str) -> int:
    """Replace every BaseAttention submodule of model by the registered `name`, keeping weights.

    kind must be "attention" (the only swappable kind so far). Dimensions,
    constructor settings with the same name and parameters with the same
    name and shape carry over; a module several parents share is replaced by one new module. Returns the
    number of modules replaced.
    """
    if kind != "attention":
        raise ValueError(f"swap kind must be 'attention', got {kind!r}")
    cls = ATTENTION_REGISTRY.get(name)
    if isinstance(model, BaseAttention):
        raise TypeError("swap replaces submodules; to convert one module use its class's constructor or from_standard")
    like = next((t for t in model.parameters() if t.is_floating_point()), None)
    if like is None:
        like = next((t for t in model.buffers() if t.is_floating_point()), None)
    built: dict[int, nn.Module] = {}  # id(old) -> its replacement: a module two parents share stays shared
    places = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseAttention):
                if id(child) not in built:
                    built[id(child)] = _rebuild(child, cls, like)
                places.append((parent, child_name, built[id(child)]))
    for parent, child_name, new in places:  # only once every replacement is built: an error changes nothing
        setattr(parent, child_name, new)
    return len(built)


class SwappableMixin:
    """Gives an nn.Module `model.swap("attention", "flash")`."""

    def swap(self, kind: str, name: str) -> int:
        return swap(self, kind, name)  # type: ignore[arg-type]
