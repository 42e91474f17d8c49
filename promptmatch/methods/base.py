"""The seam every tuning method plugs into."""
from __future__ import annotations

import copy
import functools
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .._config import DataclassConfig
from ..staging import Stage

__all__ = ["MethodConfig", "MethodNotApplicableError", "TuningMethod", "interim_losses", "register_method", "unregister_method", "get_method",
           "list_methods", "build_method"]


_ACTING = threading.local()


def _acting_methods() -> Dict[object, List[Any]]:
    """The methods whose pass runs in this thread: their gate token -> the instances acting
    under it, innermost last (one per nesting level)."""
    acting = getattr(_ACTING, "methods", None)
    if acting is None:
        acting = _ACTING.methods = {}
    return acting


class _GateToken:
    """Identifies one method for its hooks; a deep copy of the method gets its own, so a copied
    model's hooks act in the copy's passes."""

    __slots__ = ()


class GatedHook:
    """A backbone hook that acts only within :meth:`TuningMethod.acting` of its method, and then
    calls the method's hook function ``func`` (a plain function taking the method first, then
    ``args``, then the hook's arguments) on the method instance acting in this thread: a deep
    copy of the model runs its own parameters, never the original's. A hook returning None
    leaves the module as it is."""

    __slots__ = ("token", "func", "args")

    def __init__(self, token: _GateToken, func: Callable[..., Any], args: Tuple[Any, ...] = ()) -> None:
        self.token, self.func, self.args = token, func, tuple(args)

    def __call__(self, *hook_args: Any, **hook_kwargs: Any) -> Any:
        stack = _acting_methods().get(self.token)
        if not stack:
            return None
        return self.func(stack[-1], *self.args, *hook_args, **hook_kwargs)


class _GatedCallable:
    """An arbitrary hook callable gated to its method's passes (it keeps whatever it captured:
    a deep copy of the model runs the same callable, with the original's parameters)."""

    __slots__ = ("token", "hook")

    def __init__(self, token: _GateToken, hook: Callable[..., Any]) -> None:
        self.token, self.hook = token, hook

    def __call__(self, *hook_args: Any, **hook_kwargs: Any) -> Any:
        if not _acting_methods().get(self.token):
            return None
        return self.hook(*hook_args, **hook_kwargs)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_GatedCallable":
        hook = copy.deepcopy(self.hook, memo)  # a function is kept as it is, with what it captured
        if hook is self.hook and getattr(hook, "__closure__", None):
            name = getattr(hook, "__qualname__", repr(hook))
            warnings.warn(
                f"copy.deepcopy of a prompted model: its method's backbone hook {name} is a closure, "
                "so the copy's passes run what it captured (the original method's parameters). "
                "Register the hook as a bound method of the method, or a functools.partial of "
                "one, to have a copy run its own.", UserWarning, stacklevel=2)
        return _GatedCallable(copy.deepcopy(self.token, memo), hook)


class MethodNotApplicableError(ValueError):
    """A tuning method cannot be used with this backbone (e.g. token prompts on a CNN)."""


@dataclass
class MethodConfig(DataclassConfig):
    """Base class of method configs: plain, JSON-serialisable dataclasses."""

    def _fail(self, name: str, what: str) -> None:
        raise ValueError(f"{type(self).__name__}.{name} must be {what}, got {getattr(self, name)!r}")

    def _check_positive_int(self, name: str) -> None:
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            self._fail(name, "a positive int")

    def _check_bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            self._fail(name, "a bool")

    def _check_dropout(self, name: str) -> None:
        """A probability in [0, 1), stored as a float."""
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            self._fail(name, "a float in [0, 1)")
        setattr(self, name, float(v))

    #: For fields added after checkpoints of this method were first saved: the value a field
    #: takes when a saved config lacks it (the behaviour the checkpoint was trained with,
    #: which may differ from today's default).
    SAVED_BEFORE: ClassVar[Mapping[str, Any]] = {}

    #: Each change of this config's defaults, oldest first: ``(version, fields whose default
    #: changed)``; the defaults before the first entry are version 1. A benchmark cell that
    #: leaves one of those fields to the default names the version in its key, so a resumed
    #: grid never mixes results of the old defaults with the new (see :meth:`defaults_version`).
    DEFAULTS_CHANGES: ClassVar[Tuple[Tuple[int, Tuple[str, ...]], ...]] = ()

    @classmethod
    def defaults_version(cls, pinned: Iterable[str] = ()) -> int:
        """The version of the defaults that a config setting the fields ``pinned`` (and leaving
        the others to their defaults) depends on: the newest change that touched a field not in
        ``pinned``; 1 when the config does not depend on any change."""
        pinned = set(pinned)
        return max((v for v, fields in cls.DEFAULTS_CHANGES if not set(fields) <= pinned), default=1)

    @classmethod
    def named_settings(cls) -> Dict[str, "MethodConfig"]:
        """Settings with a name (versions of the defaults, today's included), as
        ``{"SPMConfig.v3()": config}``: a checkpoint whose config equals one of them and does not
        match its model is refused with that name as the way to build the model it belongs to."""
        return {}

    @classmethod
    def with_saved_defaults(cls, data: Mapping[str, Any]) -> Dict[str, Any]:
        """``data`` (a config saved in a checkpoint) with every field it lacks that was added
        later set to the value it had before that field existed."""
        return {**{k: v for k, v in cls.SAVED_BEFORE.items() if k not in data}, **dict(data)}


class TuningMethod(nn.Module):
    """Trainable parts that act at the stage boundaries of a frozen, staged backbone.

    Subclasses implement :meth:`boundary`, which receives the NCHW features of one
    boundary and returns the features the next stage should get. Per-forward state
    (a recurrent state, interim outputs) lives in the ``state`` dict made by
    :meth:`init_state`, never on the module, so one method object is reentrant.
    """

    name: str = ""
    config_class: Type[MethodConfig] = MethodConfig
    #: False for methods that train the backbone itself (full fine-tuning): it is then not
    #: frozen, follows ``train()``/``eval()`` and its buffers go into prompt checkpoints.
    freezes_backbone: bool = True
    #: learning-rate multiplier of trainable backbone parameters (see ``param_groups``)
    backbone_lr_mult: float = 1.0
    #: True for methods whose trainable parameters act inside the backbone's stages (token
    #: prompts, adapters): autograd then runs from the first layer, not the first boundary
    trains_inside_backbone: bool = False
    #: False for a method whose trainable parameters never change a stage's input (they act
    #: at the last boundary or on what the decoder reads): the backbone then runs without
    #: autograd and only the boundaries build a graph (SPM's lean mode). An instance may set it.
    grad_crosses_backbone: bool = True
    #: True for methods that change the backbone's state_dict keys when attached (peft LoRA)
    renames_backbone_keys: bool = False
    #: What a backbone must have for this method to apply, by name: ``"token_blocks"`` (a
    #: ViT-like token model: ``blocks``, ``patch_embed``, ``num_prefix_tokens``) and
    #: ``"attn_mlp_blocks"`` (blocks with an ``attn`` and an ``mlp``). A declaration for
    #: readers and the shared tests; :meth:`attach` still raises
    #: :class:`MethodNotApplicableError` on a backbone without them.
    needs: ClassVar[Tuple[str, ...]] = ()
    #: True when a freshly built method leaves the backbone's features exactly as the frozen
    #: backbone computes them (nothing injected, or zero-initialised injections)
    starts_as_backbone: ClassVar[bool] = True
    #: False for methods that change the backbone module for every pass through it (its own
    #: weights: bitfit, full; peft layers: lora, dora): one backbone then cannot serve other
    #: checkpoints too (a :class:`~promptmatch.PromptBank` refuses). Hooks made with
    #: :meth:`gated` act only in the method's own passes and keep a method shareable. An
    #: instance may set it (e.g. when :meth:`attach` had to change backbone attributes).
    shares_backbone: bool = True

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: MethodConfig) -> None:
        super().__init__()
        self.stages = tuple(stages)
        self.num_classes = num_classes
        self.config = config
        self._hook_handles: List[Any] = []
        self._gate_token = _GateToken()

    def attach(self, backbone: nn.Module) -> None:
        """Called once when the segmentor is built, after the backbone is staged (and frozen
        if :attr:`freezes_backbone`): unfreeze parts, inject modules, register hooks."""

    def init_state(self) -> Dict[str, Any]:
        return {"interim": {}}

    @contextmanager
    def acting(self) -> Iterator[None]:
        """Within the block, hooks this method made with :meth:`hook_backbone` (or :meth:`gated`)
        act (in this thread); the segmentor runs each of its passes inside it."""
        acting, token = _acting_methods(), self._gate_token
        stack = acting.setdefault(token, [])
        stack.append(self)
        try:
            yield
        finally:
            stack.pop()
            if not stack:
                del acting[token]

    def gated(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook`` (a forward or forward-pre hook for a backbone module) made to act only
        within :meth:`acting`, i.e. in this method's own passes: another segmentor sharing the
        backbone (a :class:`~promptmatch.PromptBank`) sees the module unchanged.

        A bound method of this method, or a ``functools.partial`` of one with positional
        arguments, is called on the instance acting in the thread, so ``copy.deepcopy`` of the
        model runs the copy's own parameters; any other callable (a closure) is called as it
        is, with what it captured: a copy would run the original's parameters."""
        func, args = hook, ()
        if isinstance(func, functools.partial) and not func.keywords:
            func, args = func.func, func.args
        if getattr(func, "__self__", None) is self and hasattr(func, "__func__"):
            return GatedHook(self._gate_token, func.__func__, args)
        return _GatedCallable(self._gate_token, hook)

    def hook_backbone(self, module: nn.Module, hook: Callable[..., Any], *, pre: bool = False,
                      **kwargs: Any) -> None:
        """Register ``hook`` on a backbone ``module`` (a forward hook; a forward-pre hook with
        ``pre``; ``kwargs`` go to the registration, e.g. ``prepend``), :meth:`gated` to this
        method's own passes; :meth:`remove_hooks` removes it again. Pass a bound method of
        this method (or a ``functools.partial`` of one) so that deep copies of the model run
        their own parameters."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._hook_handles.append(register(self.gated(hook), **kwargs))

    @property
    def hooked(self) -> bool:
        """True while hooks made with :meth:`hook_backbone` are registered."""
        return bool(self._hook_handles)

    def check_not_hooked(self) -> None:
        """Refuse a second :meth:`attach` while this method's hooks are on a backbone."""
        if self._hook_handles:
            raise RuntimeError(f"{self.name} is already attached to a backbone; call detach() first")

    def remove_hooks(self) -> None:
        """Remove every hook made with :meth:`hook_backbone`."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def boundary(self, index: int, features: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return features

    def interim_weights(self) -> Dict[int, float]:
        """Loss weight of each interim semantic map this method produces, by boundary index."""
        return {}

    #: how labels supervise an interim map coarser than they are: ``"nearest"`` (the label
    #: at each cell's nearest pixel) or ``"soft"`` (each cell's class proportions)
    interim_targets: str = "nearest"
    #: weight each class of an interim map's loss by the inverse of its share of the batch
    interim_class_balance: bool = False

    def decoder_reads(self, stages: Sequence[int]) -> None:
        """Told, once the head is built, which stages' features the decoder reads (default: ignored)."""

    def decoder_features(self, features: Sequence[torch.Tensor], state: Dict[str, Any]) -> List[torch.Tensor]:
        """The features a decoder reads, given the boundary outputs of one pass: those outputs,
        except where a boundary recorded in ``state["taps"]`` a pair (the tensor it returned,
        the tensor the decoder reads instead), e.g. a change meant for the decoder only."""
        taps = state.get("taps") or ()
        return [next((read for returned, read in taps if returned is f), f) for f in features]


def interim_losses(
    method: TuningMethod,
    state: Mapping[str, Any],
    labels: torch.Tensor,
    ignore_index: int,
    prefix: str = "",
) -> Dict[str, torch.Tensor]:
    """Weighted cross-entropy of each interim semantic map in ``state`` against ``labels``
    (N, H, W) resized to the map's grid by nearest neighbour, as ``<prefix>loss_interim_<k>``."""
    import torch.nn.functional as F

    weights = method.interim_weights()
    soft, balance = method.interim_targets == "soft", bool(method.interim_class_balance)
    losses: Dict[str, torch.Tensor] = {}
    for idx, logits in sorted(state.get("interim", {}).items()):
        w = weights.get(idx, 0.0)
        if w == 0:
            continue
        if not soft and not balance:
            small = _nearest_labels(labels, logits.shape[-2:])
            if (small != ignore_index).any():
                ce = F.cross_entropy(logits, small, ignore_index=ignore_index)
            else:
                ce = logits.sum() * 0.0  # all pixels ignored at this grid: no signal, no NaN
        else:
            ce = _soft_interim_ce(logits, labels, ignore_index, soft, balance)
        losses[f"{prefix}loss_interim_{idx}"] = w * ce
    return losses


def _nearest_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The (N, H, W) labels resized to ``size`` by nearest neighbour."""
    import torch.nn.functional as F

    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _grid_class_counts(labels: torch.Tensor, grid: Tuple[int, int], k: int, ignore_index: int) -> torch.Tensor:
    """(N, K, h, w): how many pixels of each class (ignored ones left out) fall into each
    cell of a ``grid`` laid over the (N, H, W) labels; cell (i, j) covers the pixels whose
    rows scale to i (``row * h // H``) and columns to j."""
    n, hh, ww = labels.shape
    h, w = grid
    rows = (torch.arange(hh, device=labels.device) * h) // hh
    cols = (torch.arange(ww, device=labels.device) * w) // ww
    cell = (rows[:, None] * w + cols[None, :]).expand(n, hh, ww)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < k)
    img = torch.arange(n, device=labels.device)[:, None, None].expand(n, hh, ww)
    index = (img[valid] * (h * w) + cell[valid]) * k + labels[valid]
    counts = torch.bincount(index, minlength=n * h * w * k).reshape(n, h, w, k)
    return counts.permute(0, 3, 1, 2)


def _soft_interim_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, soft: bool,
                     balance: bool) -> torch.Tensor:
    """Cross-entropy of an interim map against each cell's class proportions (``soft``) or its
    nearest label, optionally with classes weighted by the inverse of their share of the batch."""
    import torch.nn.functional as F

    k = logits.shape[1]
    if soft:
        target = _grid_class_counts(labels, tuple(logits.shape[-2:]), k, ignore_index).to(logits.dtype)
    else:
        small = _nearest_labels(labels, logits.shape[-2:])
        keep = (small != ignore_index) & (small >= 0) & (small < k)
        target = F.one_hot(small.clamp(0, k - 1), k).permute(0, 3, 1, 2).to(logits.dtype) * keep[:, None]
    mass = target.sum(dim=(0, 2, 3))  # per class, over the batch
    if float(mass.sum()) == 0:
        return logits.sum() * 0.0  # all pixels ignored: no signal, no NaN
    if balance:  # every present class gets the same total weight
        present = mass > 0
        cw = torch.where(present, mass.sum() / (present.sum() * mass.clamp_min(1e-12)), torch.zeros_like(mass))
        target = target * cw.view(1, -1, 1, 1)
    logp = F.log_softmax(logits.float(), dim=1)
    return -(target * logp).sum() / target.sum()


_REGISTRY: Dict[str, Type[TuningMethod]] = {}


def register_method(cls: Type[TuningMethod]) -> Type[TuningMethod]:
    """Class decorator: make a :class:`TuningMethod` selectable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a tuning method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Forget the registered method ``name`` (e.g. a test's toy method)."""
    if name not in _REGISTRY:
        raise ValueError(f"no tuning method named {name!r} is registered")
    del _REGISTRY[name]


def list_methods() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> Type[TuningMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {list(list_methods())}")
    return _REGISTRY[name]


def saved_method_config(method: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """The config dict a checkpoint of ``method`` saved, with every field added after it was
    saved set to the behaviour the checkpoint was trained with (see
    :meth:`MethodConfig.with_saved_defaults`); unknown methods are returned as they are."""
    cls = _REGISTRY.get(method)
    return cls.config_class.with_saved_defaults(config) if cls is not None else dict(config)


def build_method(
    name: str,
    stages: Sequence[Stage],
    num_classes: int,
    config: Optional[Union[MethodConfig, Mapping[str, Any]]] = None,
) -> TuningMethod:
    cls = get_method(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, Mapping):
        config = cls.config_class.from_dict(config)
    elif not isinstance(config, cls.config_class):
        raise TypeError(
            f"method {name!r} takes a {cls.config_class.__name__} (or a dict of its fields), "
            f"got {type(config).__name__}"
        )
    return cls(stages, num_classes, config)
