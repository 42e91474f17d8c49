"""The Semantic-aware Prompt Matcher (SPM).

Between stage k and stage k+1 of a frozen backbone, SPM

1. estimates an interim semantic map ``S_k`` of the stage's features (supervised by the
   labels, resized to the stage's grid);
2. turns it into a semantic context: class embeddings weighted by ``softmax(S_k)``;
3. updates a recurrent state ``h`` (a convolutional GRU cell shared by all boundaries,
   carried from boundary to boundary and resized to each one's grid) from the projected
   features and the semantic context;
4. projects ``h`` back to the stage's channels as a prompt ``P_k``, scales it by each
   position's feature scale (the matcher works on channel-normalised features, so the
   prompt is made in that space and mapped back) and hands ``F_k + gamma_k * P_k`` to the
   next stage. The output projection starts at zero, so at initialisation the model
   computes exactly what the frozen backbone computes.

Boundaries finer than ``matcher_stride`` run their matcher on an average-pooled grid and
upsample the prompt: the cost of a matcher stays bounded on high-resolution stages.
Design choices left open by the paper are documented in ``docs/spm.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..staging import Stage
from .base import MethodConfig, TuningMethod, register_method

__all__ = ["SPMConfig", "SemanticPromptMatcher", "ConvGRUCell"]


@dataclass
class SPMConfig(MethodConfig):
    """Settings of the Semantic-aware Prompt Matcher; every ablation switch lives here.

    The defaults are SPM v4 (:meth:`v4`, since 2026-12-06): lean, every read prompt at its
    boundary's own resolution, a prompt gain of 4. :meth:`v3` and :meth:`v2` give the earlier
    versions' settings, e.g. to load their prompt checkpoints."""

    hidden_dim: int = field(default=64, metadata={"help": "width d of the recurrent state and projections"})
    boundaries: Optional[Tuple[int, ...]] = field(
        default=None,
        metadata={"help": "indices of the stages after which a matcher sits (None: after every stage)"},
    )
    recurrent: bool = field(default=True, metadata={"help": "carry the state h from boundary to boundary"})
    semantic_guidance: bool = field(
        default=True, metadata={"help": "interim semantic maps and the class-embedding context"}
    )
    iterations: int = field(default=1, metadata={"help": "matcher updates per boundary"})
    interim_loss_weight: float = field(
        default=0.2, metadata={"help": "weight of the cross-entropy of each interim semantic map"}
    )
    kernel_size: int = field(default=3, metadata={"help": "depthwise spatial kernel of the GRU candidate"})
    matcher_stride: int = field(
        default=8,
        metadata={"help": "finest grid a matcher runs on, as a stride of the input: a boundary at a finer "
                          "stride is average-pooled to it and its prompt upsampled back (0: every boundary "
                          "at its own resolution)"},
    )
    prompt_scale: str = field(
        default="feature",
        metadata={"help": "'feature': the prompt is made in the matcher's normalised space and scaled by each "
                          "position's feature scale (its channel RMS around the mean), so one learning rate fits "
                          "stages and families whose features differ in magnitude by orders; 'none': added as is"},
    )
    zero_init: str = field(
        default="out_proj",
        metadata={"help": "what starts at zero so that the model starts as the frozen backbone: 'out_proj' "
                          "(the output projection; gamma starts at 1) or 'gamma' (the per-channel scale; the "
                          "projection random: slower to start, as a product of two small factors)"},
    )

    prompt_boundaries: Optional[Tuple[int, ...]] = field(
        default=None,
        metadata={"help": "the matcher boundaries whose prompt is added to the features (None: all); the "
                          "others only observe: they update the recurrent state and their interim map but "
                          "leave the features as they are (no output projection, no backpropagation "
                          "through the frozen stages that follow them)"},
    )
    prompt_deepest: int = field(
        default=2,
        metadata={"help": "only the N deepest matcher boundaries add their prompt, the others observe (0: "
                          "every matcher boundary prompts); fits any number of stages; ignored when "
                          "prompt_boundaries lists them"},
    )
    observer_decoder_prompts: bool = field(
        default=True,
        metadata={"help": "an observing boundary also makes a prompt, added only to the features a "
                          "multi-level decoder reads there, never to the next stage's input (so still no "
                          "backpropagation through the frozen stages after it)"},
    )
    decoder_taps: str = field(
        default="prompted",
        metadata={"help": "what a multi-level decoder reads at the boundaries before the last: 'prompted' "
                          "(the matcher's output, v2) or 'before_prompt' (the stage's output before this "
                          "boundary's prompt is added: a prompt then reaches the decoder only through the "
                          "deeper stages; the last stage is always read prompted)"},
    )
    prompt_dropout: float = field(
        default=0.0,
        metadata={"help": "in training, drop each sample's prompt at a boundary with this probability "
                          "(stochastic depth of the prompt; kept prompts are scaled by 1/(1-p))"},
    )
    prompt_bound: float = field(
        default=0.0,
        metadata={"help": "bound on the prompt in the matcher's normalised space: b * tanh(P / b), so "
                          "no prompt exceeds b times its position's feature scale (0: unbounded)"},
    )
    interim_targets: str = field(
        default="soft",
        metadata={"help": "how the labels supervise each (coarse) interim map: 'nearest' (the label at each "
                          "cell's nearest pixel, v2: objects smaller than a cell often vanish) or 'soft' (each "
                          "cell's class proportions: every labelled pixel counts)"},
    )
    interim_class_balance: bool = field(
        default=True,
        metadata={"help": "weight the classes of the interim maps' loss by the inverse of their share of the "
                          "batch, so that a dominant class (background) cannot make the maps uninformative"},
    )
    read_matcher_stride: Optional[int] = field(
        default=0,
        metadata={"help": "finest grid of a matcher whose prompt is read (by the next stage or the decoder), "
                          "as matcher_stride is for the others (None: matcher_stride for every matcher; 0: a "
                          "read prompt is made at its boundary's own resolution, so fine structures in a "
                          "stride-4 decoder level are not averaged away, while observers only the recurrence "
                          "reads stay on the coarse grid)"},
    )
    prompt_gain: float = field(
        default=4.0,
        metadata={"help": "fixed factor on the output projection (zero-initialised): with Adam-type optimisers "
                          "the prompt then moves g times faster than the rest at one learning rate, as LoRA's "
                          "alpha / r scales its update"},
    )
    backprop_backbone: bool = field(
        default=False,
        metadata={"help": "False (lean mode, SPMConfig.lean()): no gradient crosses the frozen backbone: "
                          "only the last boundary prompts the "
                          "features (which go to the decoder only), every earlier matcher observes (its "
                          "prompt, with observer_decoder_prompts, goes to what the decoder reads there); the "
                          "backbone runs without autograd and keeps no activations for backward, so a "
                          "training step costs the frozen forward plus the matchers and the decoder; "
                          "prompt_deepest is then ignored"},
    )
    gate: str = field(
        default="none",
        metadata={"help": "'confidence': multiply the prompt at each position by the interim map's top "
                          "class probability there (needs semantic_guidance); 'none': no gate"},
    )

    #: The value each field added after v2 takes in a checkpoint saved before it existed:
    #: the behaviour that checkpoint was trained with (see :meth:`MethodConfig.with_saved_defaults`).
    SAVED_BEFORE: ClassVar[Mapping[str, Any]] = {
        "prompt_boundaries": None, "prompt_deepest": 0, "observer_decoder_prompts": False, "decoder_taps": "prompted", "prompt_dropout": 0.0, "prompt_bound": 0.0,
        "gate": "none", "interim_targets": "nearest", "interim_class_balance": False, "backprop_backbone": True,
        "read_matcher_stride": None, "prompt_gain": 1.0}

    #: v4 became the default on 2026-12-06 (version 2 of the defaults)
    DEFAULTS_CHANGES: ClassVar[Tuple[Tuple[int, Tuple[str, ...]], ...]] = (
        (2, ("read_matcher_stride", "prompt_gain", "backprop_backbone")),)

    SAVED_BEFORE_HINT: ClassVar[str] = ("method_cfg=promptmatch.SPMConfig.v3() for an SPM v3 checkpoint (saved "
                                         "2026-12-02 to 2026-12-06), promptmatch.SPMConfig.v2() for an older one")

    @classmethod
    def named_settings(cls) -> Dict[str, "MethodConfig"]:
        return {"SPMConfig.v4()": cls.v4(), "SPMConfig.lean()": cls.lean(), "SPMConfig.v3()": cls.v3(),
                "SPMConfig.v2()": cls.v2()}

    @classmethod
    def v3(cls, **changes: Any) -> "SPMConfig":
        """The settings of SPM v3 (the defaults from 2026-12-02 to 2026-12-06): matchers at every boundary, the two deepest
        prompting the next stage and the earlier ones observing (their prompts go to the
        decoder only), interim maps supervised by class proportions with balanced classes."""
        base = dict(cls.v2().to_dict(), prompt_deepest=2, observer_decoder_prompts=True, interim_targets="soft",
                    interim_class_balance=True)
        base.update(changes)
        return cls(**base)

    @classmethod
    def v4(cls, **changes: Any) -> "SPMConfig":
        """The settings of SPM v4 (the defaults since 2026-12-06): lean (no prompt enters a
        frozen stage, the backbone runs without autograd), every prompt that is read made at its
        boundary's own resolution (``read_matcher_stride=0``: a stride-4 decoder level gets a
        stride-4 prompt) and a prompt gain of 4."""
        base = dict(cls.lean().to_dict(), read_matcher_stride=0, prompt_gain=4.0)
        base.update(changes)
        return cls(**base)

    @classmethod
    def lean(cls, **changes: Any) -> "SPMConfig":
        """SPM's lean mode: v3's matchers at every boundary, but no prompt enters a frozen stage
        (``backprop_backbone=False``): the backbone runs without autograd, only the matchers and the decoder
        are trained through."""
        base = dict(cls.v3().to_dict(), backprop_backbone=False)
        base.update(changes)
        return cls(**base)

    @classmethod
    def v2(cls, **changes: Any) -> "SPMConfig":
        """The settings of SPM v2 (promptmatch up to 2026-12-01), e.g. to load its checkpoints."""
        base = dict(hidden_dim=64, boundaries=None, recurrent=True, semantic_guidance=True, iterations=1,
                    interim_loss_weight=0.2, kernel_size=3, matcher_stride=8, prompt_scale="feature",
                    zero_init="out_proj", **cls.SAVED_BEFORE)
        base.update(changes)
        return cls(**base)

    def __post_init__(self) -> None:
        self._check_positive_int("hidden_dim")
        if self.boundaries is not None:
            b = tuple(self.boundaries)
            if not b or not all(isinstance(i, int) and not isinstance(i, bool) for i in b):
                raise ValueError(f"SPMConfig.boundaries must be a non-empty sequence of ints or None, got {self.boundaries!r}")
            if len(set(b)) != len(b):
                raise ValueError(f"SPMConfig.boundaries has duplicates: {b}")
            self.boundaries = tuple(sorted(b))
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise ValueError(f"SPMConfig.iterations must be an int >= 1, got {self.iterations!r}")
        if not isinstance(self.interim_loss_weight, (int, float)) or self.interim_loss_weight < 0:
            raise ValueError(f"SPMConfig.interim_loss_weight must be >= 0, got {self.interim_loss_weight!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SPMConfig.kernel_size must be an odd int >= 1, got {self.kernel_size!r}")
        if not isinstance(self.matcher_stride, int) or isinstance(self.matcher_stride, bool) or self.matcher_stride < 0:
            raise ValueError(f"SPMConfig.matcher_stride must be an int >= 0, got {self.matcher_stride!r}")
        if (isinstance(self.prompt_gain, bool) or not isinstance(self.prompt_gain, (int, float))
                or not 0 < self.prompt_gain < float("inf")):
            raise ValueError(f"SPMConfig.prompt_gain must be a finite number > 0, got {self.prompt_gain!r}")
        self.prompt_gain = float(self.prompt_gain)
        rs = self.read_matcher_stride
        if rs is not None and (not isinstance(rs, int) or isinstance(rs, bool) or rs < 0):
            raise ValueError(f"SPMConfig.read_matcher_stride must be None or an int >= 0, got {rs!r}")
        if self.prompt_scale not in ("feature", "none"):
            raise ValueError(f"SPMConfig.prompt_scale must be 'feature' or 'none', got {self.prompt_scale!r}")
        if self.zero_init not in ("gamma", "out_proj"):
            raise ValueError(f"SPMConfig.zero_init must be 'gamma' or 'out_proj', got {self.zero_init!r}")
        for name in ("recurrent", "semantic_guidance"):
            self._check_bool(name)
        if self.prompt_boundaries is not None:
            pb = tuple(self.prompt_boundaries)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in pb):
                raise ValueError(f"SPMConfig.prompt_boundaries must be a sequence of ints or None, "
                                 f"got {self.prompt_boundaries!r}")
            if len(set(pb)) != len(pb):
                raise ValueError(f"SPMConfig.prompt_boundaries has duplicates: {pb}")
            self.prompt_boundaries = tuple(sorted(pb))
        if not isinstance(self.prompt_deepest, int) or isinstance(self.prompt_deepest, bool) or self.prompt_deepest < 0:
            raise ValueError(f"SPMConfig.prompt_deepest must be an int >= 0 (0: every matcher prompts), "
                             f"got {self.prompt_deepest!r}")
        if self.decoder_taps not in ("prompted", "before_prompt"):
            raise ValueError(f"SPMConfig.decoder_taps must be 'prompted' or 'before_prompt', "
                             f"got {self.decoder_taps!r}")
        self._check_bool("observer_decoder_prompts")
        self._check_dropout("prompt_dropout")
        if (not isinstance(self.prompt_bound, (int, float)) or isinstance(self.prompt_bound, bool)
                or not self.prompt_bound >= 0 or self.prompt_bound == float("inf")):
            raise ValueError(f"SPMConfig.prompt_bound must be a finite number >= 0 (0: unbounded), "
                             f"got {self.prompt_bound!r}")
        if self.interim_targets not in ("nearest", "soft"):
            raise ValueError(f"SPMConfig.interim_targets must be 'nearest' or 'soft', got {self.interim_targets!r}")
        self._check_bool("interim_class_balance")
        self._check_bool("backprop_backbone")
        if not self.backprop_backbone and self.prompt_boundaries is not None:
            raise ValueError("SPMConfig.backprop_backbone=False (lean mode, the default) decides which boundaries prompt (the "
                             f"last one only); leave prompt_boundaries=None (got {self.prompt_boundaries!r}), or set "
                             "backprop_backbone=True to choose the boundaries that prompt the next stage")
        if self.gate not in ("none", "confidence"):
            raise ValueError(f"SPMConfig.gate must be 'none' or 'confidence', got {self.gate!r}")
        if self.gate == "confidence" and not self.semantic_guidance:
            raise ValueError("SPMConfig.gate='confidence' gates the prompt by the interim semantic map, which "
                             "semantic_guidance=False turns off: use gate='none' or semantic_guidance=True")


def _channel_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the channels of an NCHW map, without affine parameters, and the
    per-position scale (N, 1, H, W) it divided by."""
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    scale = (centred.pow(2).mean(1, keepdim=True) + eps).sqrt()
    return centred / scale, scale


class ConvGRUCell(nn.Module):
    """A light convolutional GRU: 1x1 gates, 1x1 + depthwise kxk candidate."""

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.gates = nn.Conv2d(input_dim + hidden_dim, 2 * hidden_dim, 1)
        self.candidate = nn.Conv2d(input_dim + hidden_dim, hidden_dim, 1)
        self.spatial = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        reset, update = torch.sigmoid(self.gates(torch.cat([x, h], 1))).chunk(2, 1)
        cand = torch.tanh(self.spatial(self.candidate(torch.cat([x, reset * h], 1))))
        return (1 - update) * h + update * cand


@register_method
class SemanticPromptMatcher(TuningMethod):
    """Recurrent, semantic-aware prompt matchers between the stages of a frozen backbone."""

    name = "spm"
    config_class = SPMConfig

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: SPMConfig) -> None:
        super().__init__(stages, num_classes, config)
        n = len(self.stages)
        bounds = config.boundaries if config.boundaries is not None else tuple(range(n))
        bad = [b for b in bounds if not -n <= b < n]
        if bad:
            raise ValueError(f"SPMConfig.boundaries {bad} out of range for a backbone with {n} stages")
        self.boundary_indices = tuple(sorted({b % n for b in bounds}))
        if not config.backprop_backbone:  # lean: nothing enters a later stage: no gradient crosses the backbone
            self.prompt_indices = tuple(b for b in self.boundary_indices if b == n - 1)
            self.grad_crosses_backbone = False
        elif config.prompt_boundaries is None:
            self.prompt_indices = self.boundary_indices[-config.prompt_deepest:] if config.prompt_deepest \
                else self.boundary_indices
        else:
            bad = [b for b in config.prompt_boundaries
                   if not -n <= b < n or b % n not in self.boundary_indices]
            if bad:
                raise ValueError(f"SPMConfig.prompt_boundaries {bad} are not matcher boundaries "
                                 f"{self.boundary_indices} of this {n}-stage backbone (a boundary must have "
                                 f"a matcher to add a prompt)")
            self.prompt_indices = tuple(sorted({b % n for b in config.prompt_boundaries}))
        self._last_stage = n - 1
        d = config.hidden_dim
        self.in_proj = nn.ModuleDict()
        self.out_proj = nn.ModuleDict()
        self.gamma = nn.ParameterDict()
        self.classifier = nn.ModuleDict()
        self.pool: Dict[str, int] = {}
        for b in self.boundary_indices:
            c = self.stages[b].channels
            self.in_proj[str(b)] = nn.Conv2d(c, d, 1)
            # an observing boundary has no way back to the features (unless it prompts the decoder)
            if b in self.prompt_indices or config.observer_decoder_prompts:
                self.out_proj[str(b)] = nn.Conv2d(d, c, 1)
                if config.zero_init == "out_proj":
                    nn.init.zeros_(self.out_proj[str(b)].weight)
                    nn.init.zeros_(self.out_proj[str(b)].bias)
                    self.gamma[str(b)] = nn.Parameter(torch.ones(c))
                else:
                    self.gamma[str(b)] = nn.Parameter(torch.zeros(c))
            self._set_pool(b, read=str(b) in self.out_proj)
            if config.semantic_guidance:
                cls = nn.Conv2d(d, num_classes, 1)
                nn.init.zeros_(cls.weight)  # uniform interim maps at start, not over-confident ones
                nn.init.zeros_(cls.bias)
                self.classifier[str(b)] = cls
        if config.semantic_guidance:
            self.class_embed = nn.Parameter(torch.randn(num_classes, d) * 0.02)
        else:
            self.register_parameter("class_embed", None)
        self.cell = ConvGRUCell(2 * d if config.semantic_guidance else d, d, config.kernel_size)

    def _set_pool(self, b: int, read: bool) -> None:
        """How much boundary ``b``'s matcher pools its features: to ``matcher_stride``, or to
        ``read_matcher_stride`` where its prompt is read."""
        cfg: SPMConfig = self.config
        stride = cfg.read_matcher_stride if read and cfg.read_matcher_stride is not None else cfg.matcher_stride
        red = self.stages[b].reduction
        self.pool.pop(str(b), None)
        if stride and red < stride:
            self.pool[str(b)] = max(1, stride // max(red, 1))

    def init_state(self) -> Dict[str, Any]:
        return {"interim": {}, "h": None, "taps": []}

    @property
    def interim_targets(self) -> str:  # type: ignore[override]
        return self.config.interim_targets

    @property
    def interim_class_balance(self) -> bool:  # type: ignore[override]
        return self.config.interim_class_balance

    def interim_weights(self) -> Dict[int, float]:
        if not self.config.semantic_guidance or self.config.interim_loss_weight == 0:
            return {}
        return {b: float(self.config.interim_loss_weight) for b in self.boundary_indices}

    def decoder_reads(self, stages: Sequence[int]) -> None:
        """An observer's prompt only serves the decoder: drop those at levels it never reads
        (a linear decoder reads the last stage only), so that no parameter goes untrained."""
        read = {int(s) % (self._last_stage + 1) for s in stages}
        for b in self.boundary_indices:
            if b not in self.prompt_indices and b not in read and str(b) in self.out_proj:
                del self.out_proj[str(b)]
                del self.gamma[str(b)]
                self._set_pool(b, read=False)
        if not len(self.out_proj) and not self.config.backprop_backbone:
            raise ValueError(
                f"SPM's matchers at boundaries {list(self.boundary_indices)} make no prompt that anything reads: in "
                "lean mode (backprop_backbone=False, the default) only the last stage's boundary prompts the "
                "features and the others only what a multi-level decoder reads at their stage. Put a matcher "
                "after the last stage (boundaries=None), use a decoder that reads these stages, or set "
                "backprop_backbone=True")

    def _prompt(self, key: str, h: torch.Tensor, logits: Optional[torch.Tensor], scale: torch.Tensor
                ) -> torch.Tensor:
        cfg: SPMConfig = self.config
        prompt = self.out_proj[key](h)
        if cfg.prompt_gain != 1.0:
            prompt = prompt * cfg.prompt_gain
        if cfg.prompt_bound:
            b = float(cfg.prompt_bound)
            prompt = b * torch.tanh(prompt / b)
        prompt = self.gamma[key].view(1, -1, 1, 1) * prompt
        if cfg.gate == "confidence" and logits is not None:
            prompt = prompt * logits.softmax(1).amax(1, keepdim=True)
        if cfg.prompt_scale == "feature":
            prompt = prompt * scale.detach()
        if cfg.prompt_dropout and self.training:
            keep = 1.0 - cfg.prompt_dropout
            mask = torch.rand(prompt.shape[0], 1, 1, 1, device=prompt.device) < keep
            prompt = prompt * mask.to(prompt.dtype) / keep
        return prompt

    def boundary(self, index: int, features: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        key = str(index)
        if key not in self.in_proj:
            return features
        cfg: SPMConfig = self.config
        h_prev = state.get("h") if cfg.recurrent else None
        full_size = features.shape[-2:]
        k = self.pool.get(key, 1)
        coarse = F.avg_pool2d(features, k, ceil_mode=True) if k > 1 else features
        n, _, hgt, wid = coarse.shape
        if h_prev is None:
            h = features.new_zeros(n, cfg.hidden_dim, hgt, wid)
        elif h_prev.shape[-2:] != (hgt, wid):
            h = F.interpolate(h_prev, size=(hgt, wid), mode="bilinear", align_corners=False)
        else:
            h = h_prev
        prompts = key in self.out_proj
        observing = index not in self.prompt_indices
        out = coarse
        logits = None
        prompt = None
        for i in range(cfg.iterations):
            normed, scale = _channel_layer_norm(out)
            z = self.in_proj[key](normed)
            if cfg.semantic_guidance:
                logits = self.classifier[key](z)
                context = torch.einsum("nkhw,kd->ndhw", logits.softmax(1), self.class_embed)
                z = torch.cat([z, context], 1)
            h = self.cell(z, h)
            if prompts:
                prompt = self._prompt(key, h, logits, scale)
                if i + 1 < cfg.iterations and not observing:
                    out = coarse + prompt
        state["h"] = h
        if logits is not None:
            state["interim"][index] = logits
        if prompt is None:  # an observing boundary
            return features
        if k > 1:
            prompt = F.interpolate(prompt, size=full_size, mode="bilinear", align_corners=False)
        if observing:  # its prompt goes to the decoder only: the next stage gets the features as they are
            if index != self._last_stage:
                state.setdefault("taps", []).append((features, features + prompt))
            return features
        out = features + prompt
        if cfg.decoder_taps == "before_prompt" and index != self._last_stage:
            state.setdefault("taps", []).append((out, features))
        return out
