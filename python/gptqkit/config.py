"""Quantization settings: :class:`QuantizeConfig`.

Example::

    from gptqkit import QuantizeConfig
    cfg = QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True)
    cfg.save("out/")                         # out/quantize_config.json
    cfg = QuantizeConfig.load("out/")
    cfg.to_quantization_config()             # the dict for config.json's "quantization_config"

Per-module overrides (``dynamic``)
----------------------------------
``dynamic`` maps regular expressions to overrides, for modules whose settings
should differ from the defaults::

    QuantizeConfig(bits=4, group_size=128, dynamic={
        r".*\\.down_proj": {"bits": 8},                  # every down_proj in 8-bit
        r"model\\.layers\\.0\\..*": {"group_size": 32},  # finer groups in the first block
        r"-:.*\\.self_attn\\.o_proj": {},                 # never quantize o_proj
        r".*\\.mlp\\.gate_proj": False,                   # skip, another spelling
    })

Exactly what is supported:

* Patterns are matched against the module's **full dotted name** in the model
  (``"model.layers.3.mlp.down_proj"``) with :func:`re.match`, i.e. anchored at
  the start of the name but not at its end (GPTQModel's convention); use
  ``.*`` to float and ``$`` to anchor the end.
* A key prefixed ``"-:"`` is a *skip* pattern: matching modules are left
  unquantized (their value must be ``{}``, ``None``, ``False`` or
  ``{"skip": True}``). The value ``False`` or ``{"skip": True}`` under a plain
  or ``"+:"`` key skips as well.
* A key prefixed ``"+:"`` is an explicit positive pattern and means the same as
  no prefix. It does not add modules that would not be quantized anyway: what
  is considered is a block's Linear-like layers (narrowed by
  ``modules_in_block_to_quantize``) and ``lm_head`` only when ``lm_head=True``.
* Skips win: a module matching any skip pattern is skipped. Otherwise the
  **first** positive pattern that matches, in the dict's order, applies; later
  matches are ignored (overrides are not merged across patterns). Checkpoints
  store every skip as a ``"-:"`` key ahead of the other rules, the one
  spelling GPTQModel (which applies the first matching rule) reads the same.
* Overrides may set ``bits``, ``group_size``, ``sym``, ``desc_act``,
  ``static_groups`` and ``damp_percent``; anything else raises. Values are
  validated like the fields of the same name.

:meth:`QuantizeConfig.resolve` applies these rules and returns the effective
:class:`LayerSettings` of one module, or ``None`` when it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = ["LayerSettings", "QuantizeConfig", "QUANTIZE_CONFIG_FILE"]

QUANTIZE_CONFIG_FILE = "quantize_config.json"
SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
OVERRIDE_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent")

DynamicValue = Union[Dict[str, Any], bool, None]


def _version() -> str:
    try:
        from gptqkit import __version__
        return str(__version__)
    except Exception:
        try:
            from importlib.metadata import version
            return version("gptqkit")
        except Exception:
            return "unknown"


# --------------------------------------------------------------------------- validators

def _check_bits(v, what="bits"):
    if isinstance(v, bool) or not isinstance(v, int) or v not in SUPPORTED_BITS:
        raise ValueError(f"{what}: expected one of {SUPPORTED_BITS}, got {v!r}")


def _check_group_size(v, what="group_size"):
    if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v > 0):
        raise ValueError(f"{what}: expected -1 (one group per output channel) or a positive integer, got {v!r}")


def _check_damp(v, what="damp_percent"):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) <= 1):
        raise ValueError(f"{what}: expected a fraction of the mean Hessian diagonal in (0, 1], got {v!r} "
                         f"(0.01 means 1 %)")


def _check_bool(v, what):
    if not isinstance(v, bool):
        raise ValueError(f"{what}: expected True or False, got {v!r}")


def _check_positive_int(v, what, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        none = " or None" if allow_none else ""
        raise ValueError(f"{what}: expected a positive integer{none}, got {v!r}")


_OVERRIDE_CHECKS = {
    "bits": _check_bits,
    "group_size": _check_group_size,
    "sym": _check_bool,
    "desc_act": _check_bool,
    "static_groups": _check_bool,
    "damp_percent": _check_damp,
}


@dataclass(frozen=True)
class LayerSettings:
    """Effective GPTQ settings of one module, after ``dynamic`` overrides.

    ``as_kwargs()`` gives the keyword arguments of :func:`gptqkit.quantize_weight`.
    """

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    static_groups: bool
    damp_percent: float
    block_size: int
    act_group_aware: bool = False

    def as_kwargs(self) -> Dict[str, Any]:
        """``{bits, group_size, sym, desc_act, static_groups, damp_percent, block_size, act_group_aware}``."""
        return asdict(self)


def _split_key(key: str):
    if key.startswith("-:"):
        return "skip", key[2:]
    if key.startswith("+:"):
        return "plus", key[2:]
    return "plain", key


def dynamic_for_readers(dynamic: Mapping[str, Any]) -> Dict[str, Any]:
    """``dynamic`` rules spelled so that GPTQModel reads them as gptqkit does.

    GPTQModel knows only ``"-:"`` keys as skips (a ``False`` or
    ``{"skip": True}`` value is not understood) and applies the *first*
    matching rule, skip or not, where gptqkit lets any skip win. So every skip
    is written as ``"-:PATTERN": {}`` and put first; the other rules follow in
    their order. gptqkit resolves the result exactly as the input.
    """
    normalised, _ = QuantizeConfig._normalise_dynamic(dynamic)
    skips: Dict[str, Any] = {}
    others: Dict[str, Any] = {}
    for key, val in (normalised or {}).items():
        kind, pattern = _split_key(key)
        if kind == "skip" or val is False or val == {"skip": True}:
            skips[f"-:{pattern}"] = {}
        else:
            others[key] = dict(val)
    return {**skips, **others}


@dataclass
class QuantizeConfig:
    """GPTQ quantization settings; every field is validated at construction.

    Attributes:
        bits: bits per weight: 2, 3, 4 or 8.
        group_size: input columns sharing one scale/zero (e.g. 128), or -1 for
            one grid per output channel.
        damp_percent: Hessian damping as a fraction of its mean diagonal, in
            (0, 1]; raised automatically when a Hessian is not positive definite.
        desc_act: act-order: quantize columns by decreasing Hessian diagonal
            (better accuracy; the checkpoint then carries a non-trivial ``g_idx``).
        static_groups: fix every group's grid from the unquantized weights
            before the sweep (keeps ``g_idx`` sequential with ``desc_act``).
        act_group_aware: group-aware act-order (Gafni et al. 2025; GPTQModel
            uses it by default too): quantize each group's columns by
            decreasing Hessian diagonal and whole groups by their largest
            one. Groups stay whole, so the checkpoint is an ordinary
            ``desc_act=False`` one (sequential ``g_idx``, every kernel's fast
            path) with much of act-order's accuracy. ``None`` (default): on
            for every layer where it applies, i.e. without ``desc_act`` and
            with ``group_size > 0`` (a ``dynamic`` override can change both
            per layer); ``False``: the paper's natural column order; ``True``:
            on, and an error if combined with ``desc_act`` or ``group_size``
            -1. See :attr:`group_aware_order` for the resolved value.
        sym: symmetric grid (zero point in the middle) instead of asymmetric min-max.
        true_sequential: quantize a block's layers group by group (q/k/v, then
            o, then gate/up, then down), recomputing each group's inputs from
            the already quantized ones; ``False`` takes all inputs of a block
            from the unquantized block.
        block_size: lazy-batch width of the GPTQ column sweep (speed only).
        modules_in_block_to_quantize: ``None`` (all Linear-like layers of each
            block, grouped as discovered) or a list of groups of layer names
            relative to a block, e.g. ``[["self_attn.q_proj",
            "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]``;
            these groups replace the discovered ones, layers not listed stay
            unquantized.
        lm_head: also quantize the output projection.
        dynamic: per-module overrides by regex, see the module docs; ``None``
            or ``{}`` for none.
        model_seqlen: calibration/context length to use; ``None`` lets the
            caller decide (usually from the model config).
        cache_block_outputs: keep each block's outputs as the next block's
            inputs (fast, uses memory) instead of recomputing them.
        clip_steps: clipping search of every group's grid: 0 keeps GPTQ's
            min-max range; N > 0 also tries N ranges shrunk evenly down to
            ``clip_min_ratio`` of it and keeps the one with the least
            Hessian-weighted error (see :func:`gptqkit.quantize_weight`).
            Default 16: on SmolLM2-135M (4-bit, g128) it cut the KL
            divergence from the fp32 model by a third (0.321 -> 0.211) for
            4-11 % more quantization time (two runs); the checkpoint format is
            unchanged.
        clip_min_ratio: smallest range tried by the clipping search, in (0, 1].
        gptaq: asymmetric calibration (GPTAQ, Li et al. 2025; see
            :mod:`gptqkit.gptaq`): fit every layer's quantized output on the
            partly quantized model's inputs to the *unquantized* model's
            output, so that each layer also compensates the error of the
            layers before it. Runs the unquantized model beside the quantized
            one (one more hidden-state cache and forward pass per layer
            group); the checkpoint format is unchanged. Routed MoE experts
            keep plain GPTQ (the two models route tokens differently).
        gptaq_alpha: how much of asymmetric calibration's target shift to
            apply, in (0, 1] (1: the exact asymmetric objective).
        checkpoint_format: ``"gptq"`` (v1: stored zero points are
            ``zero - 1``, what AutoGPTQ, GPTQModel and transformers load) or
            ``"gptq_v2"`` (true zero points).
    """

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    act_group_aware: Optional[bool] = None
    sym: bool = True
    true_sequential: bool = True
    block_size: int = 128
    modules_in_block_to_quantize: Optional[List[List[str]]] = None
    lm_head: bool = False
    dynamic: Optional[Dict[str, DynamicValue]] = None
    model_seqlen: Optional[int] = None
    cache_block_outputs: bool = True
    checkpoint_format: str = "gptq"
    clip_steps: int = 16
    clip_min_ratio: float = 0.75
    gptaq: bool = False
    gptaq_alpha: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks (and normalises) every field; runs at construction, call it again after mutating.

        Raises:
            ValueError: naming the first invalid field.
        """
        _check_bits(self.bits)
        _check_group_size(self.group_size)
        _check_damp(self.damp_percent)
        self.damp_percent = float(self.damp_percent)
        for name in ("desc_act", "static_groups", "sym", "true_sequential", "lm_head", "cache_block_outputs",
                     "gptaq"):
            _check_bool(getattr(self, name), name)
        if self.act_group_aware is not None:
            _check_bool(self.act_group_aware, "act_group_aware")
        if self.act_group_aware and self.desc_act:
            raise ValueError("act_group_aware: cannot be combined with desc_act (both set the column order); "
                             "choose one")
        if self.act_group_aware and self.group_size == -1:
            raise ValueError("act_group_aware: needs group_size > 0 (with one group per output channel, "
                             "desc_act keeps g_idx sequential as well)")
        _check_positive_int(self.block_size, "block_size")
        _check_positive_int(self.model_seqlen, "model_seqlen", allow_none=True)
        if isinstance(self.clip_steps, bool) or not isinstance(self.clip_steps, int) or not 0 <= self.clip_steps <= 1000:
            raise ValueError(f"clip_steps: expected an integer in [0, 1000], got {self.clip_steps!r}")
        if isinstance(self.clip_min_ratio, bool) or not isinstance(self.clip_min_ratio, (int, float)) \
                or not 0.0 < float(self.clip_min_ratio) <= 1.0:
            raise ValueError(f"clip_min_ratio: expected a number in (0, 1], got {self.clip_min_ratio!r}")
        self.clip_min_ratio = float(self.clip_min_ratio)
        if isinstance(self.gptaq_alpha, bool) or not isinstance(self.gptaq_alpha, (int, float)) \
                or not 0.0 < float(self.gptaq_alpha) <= 1.0:
            raise ValueError(f"gptaq_alpha: expected a number in (0, 1], got {self.gptaq_alpha!r}")
        self.gptaq_alpha = float(self.gptaq_alpha)
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")
        self.modules_in_block_to_quantize = self._normalise_modules(self.modules_in_block_to_quantize)
        self.dynamic, _ = self._normalise_dynamic(self.dynamic)

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _normalise_modules(value):
        what = "modules_in_block_to_quantize"
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{what}: expected None or a list of lists of layer names, got {value!r}")
        if len(value) == 0:
            raise ValueError(f"{what}: expected at least one group (use None to quantize every layer)")
        out, seen = [], set()
        for i, group in enumerate(value):
            if isinstance(group, str):
                raise ValueError(f"{what}[{i}]: expected a list of layer names, got the string {group!r} "
                                 f"(wrap it: [[{group!r}]])")
            if not isinstance(group, (list, tuple)) or len(group) == 0:
                raise ValueError(f"{what}[{i}]: expected a non-empty list of layer names, got {group!r}")
            for name in group:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{what}[{i}]: expected layer names (non-empty strings), got {name!r}")
                if name in seen:
                    raise ValueError(f"{what}[{i}]: {name!r} appears more than once")
                seen.add(name)
            out.append(list(group))
        return out

    @staticmethod
    def _normalise_dynamic(value):
        if value is None:
            return None, []
        if not isinstance(value, Mapping):
            raise ValueError(f"dynamic: expected None or a dict of regex -> overrides, got {type(value).__name__}")
        if len(value) == 0:
            return None, []
        out, compiled = {}, []
        for key, val in value.items():
            what = f"dynamic[{key!r}]"
            if not isinstance(key, str):
                raise ValueError(f"dynamic: keys must be regex strings, got {key!r}")
            kind, pattern = _split_key(key)
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{what}: invalid regular expression ({exc})") from None
            if kind == "skip":
                if val not in (None, False) and not (isinstance(val, Mapping) and
                                                     (len(val) == 0 or dict(val) == {"skip": True})):
                    raise ValueError(f"{what}: a '-:' key skips the modules it matches; its value must be "
                                     f"{{}}, None, False or {{'skip': True}}, got {val!r}")
                out[key] = {} if val is None or val is False else dict(val)
                compiled.append((True, rx, None))
                continue
            if val is False:
                out[key] = False
                compiled.append((True, rx, None))
                continue
            if not isinstance(val, Mapping):
                raise ValueError(f"{what}: expected a dict of overrides {list(OVERRIDE_KEYS)}, False or "
                                 f"{{'skip': True}}, got {val!r}")
            val = dict(val)
            if "skip" in val:
                skip = val.pop("skip")
                if not isinstance(skip, bool):
                    raise ValueError(f"{what}: 'skip' must be True or False, got {skip!r}")
                if skip:
                    if val:
                        raise ValueError(f"{what}: 'skip': True cannot be combined with overrides {sorted(val)}")
                    out[key] = {"skip": True}
                    compiled.append((True, rx, None))
                    continue
            unknown = sorted(set(val) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(f"{what}: unknown override(s) {unknown}; supported: {list(OVERRIDE_KEYS)} "
                                 f"and 'skip'")
            for k, v in val.items():
                _OVERRIDE_CHECKS[k](v, f"{what}[{k!r}]")
                if k == "damp_percent":
                    val[k] = float(v)
            out[key] = val
            compiled.append((False, rx, val))
        return out, compiled

    # ------------------------------------------------------------------ per-module settings
    def resolve(self, module_name: str) -> Optional[LayerSettings]:
        """Effective settings of the module with full dotted name ``module_name``.

        Applies ``dynamic`` (see the module docs): ``None`` when a skip pattern
        matches, otherwise the defaults updated with the first matching
        positive pattern's overrides. It does not look at
        ``modules_in_block_to_quantize`` or ``lm_head``: deciding which modules
        are candidates at all is the caller's job.
        """
        _, compiled = self._normalise_dynamic(self.dynamic)
        if any(skip and rx.match(module_name) for skip, rx, _ in compiled):
            return None
        values = {k: getattr(self, k) for k in OVERRIDE_KEYS}
        for skip, rx, overrides in compiled:
            if not skip and rx.match(module_name):
                values.update(overrides)
                break
        return LayerSettings(block_size=self.block_size,
                             act_group_aware=self._group_aware(values["desc_act"], values["group_size"]), **values)

    def _group_aware(self, desc_act: bool, group_size: int) -> bool:
        # None (automatic) and True both mean "where it applies"; True's conflicts are refused in validate().
        return self.act_group_aware is not False and not desc_act and group_size > 0

    @property
    def group_aware_order(self) -> bool:
        """Whether layers without a ``dynamic`` override use the group-aware
        column order: ``act_group_aware`` resolved against ``desc_act`` and
        ``group_size``."""
        return self._group_aware(self.desc_act, self.group_size)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """All fields as a JSON-friendly dict (round-trips through :meth:`from_dict`)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "modules_in_block_to_quantize" and v is not None:
                v = [list(g) for g in v]
            elif f.name == "dynamic" and v is not None:
                v = {k: (dict(x) if isinstance(x, dict) else x) for k, x in v.items()}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizeConfig":
        """Builds a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a dict of QuantizeConfig fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QuantizeConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(d))

    def to_quantization_config(self) -> Dict[str, Any]:
        """The ``quantization_config`` dict for ``config.json`` (also written as ``quantize_config.json``).

        Keys: ``quant_method: "gptq"``, ``bits``, ``group_size``, ``desc_act``,
        ``sym``, ``static_groups``, ``true_sequential``, ``damp_percent``,
        ``lm_head``, ``checkpoint_format``, ``meta: {quantizer:
        "gptqkit:VERSION", block_size, cache_block_outputs, clip_steps,
        clip_min_ratio, act_group_aware}`` (GPTQModel keeps its
        ``act_group_aware`` in ``meta`` too) and, with ``gptaq``,
        ``meta.gptaq: {alpha}`` (GPTQModel's spelling), plus ``dynamic``,
        ``modules_in_block_to_quantize`` and ``model_seqlen`` when set. This is
        what transformers, AutoGPTQ and GPTQModel read; loading it back with
        :meth:`from_quantization_config` restores this config exactly, except
        that an automatic ``act_group_aware`` (``None``) comes back as the
        value it resolved to, and ``dynamic`` skips come back spelled
        ``"-:PATTERN": {}`` and listed first (:func:`dynamic_for_readers`; they
        resolve the same).
        """
        d: Dict[str, Any] = {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": self.lm_head,
            "checkpoint_format": self.checkpoint_format,
        }
        if self.dynamic is not None:
            d["dynamic"] = dynamic_for_readers(self.dynamic)
        if self.modules_in_block_to_quantize is not None:
            d["modules_in_block_to_quantize"] = [list(g) for g in self.modules_in_block_to_quantize]
        if self.model_seqlen is not None:
            d["model_seqlen"] = self.model_seqlen
        d["meta"] = {
            "quantizer": f"gptqkit:{_version()}",
            "block_size": self.block_size,
            "cache_block_outputs": self.cache_block_outputs,
            "clip_steps": self.clip_steps,
            "clip_min_ratio": self.clip_min_ratio,
            "act_group_aware": self.group_aware_order,
        }
        if self.gptaq:
            d["meta"]["gptaq"] = {"alpha": self.gptaq_alpha}
        return d

    @classmethod
    def from_quantization_config(cls, d: Mapping[str, Any]) -> "QuantizeConfig":
        """Reads a ``quantization_config`` / ``quantize_config.json`` dict from any GPTQ tool.

        Accepts gptqkit's own output and the AutoGPTQ, GPTQModel and
        transformers (``GPTQConfig``) variants: missing fields get this class's
        defaults (``sym`` True, ``desc_act`` False, ...); ``checkpoint_format``
        (or GPTQModel's ``format``) absent means ``"gptq"``; ``damp_percent``,
        ``static_groups``, ``true_sequential`` may sit in GPTQModel's ``meta``;
        keys no GPTQ checkpoint needs (``model_name_or_path``, ``tokenizer``,
        ``dataset``, ``use_exllama``, ``pack_dtype: "int32"``, ...) are ignored.

        Raises:
            ValueError: a non-GPTQ ``quant_method``, Marlin/bitblas/other
                checkpoint formats, a pack dtype other than int32, or invalid
                field values (naming the field).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"quantization_config: expected a dict, got {type(d).__name__}")
        method = d.get("quant_method", "gptq")
        method = str(getattr(method, "value", method)).lower()
        if method != "gptq":
            raise ValueError(f"quant_method: expected 'gptq', got {method!r} (not a GPTQ checkpoint)")
        if d.get("is_marlin_format"):
            raise ValueError("is_marlin_format: Marlin-repacked checkpoints are not supported; "
                             "use a plain GPTQ checkpoint")
        fmt = d.get("checkpoint_format")
        if fmt is None:
            fmt = d.get("format")
        fmt = "gptq" if fmt is None else str(getattr(fmt, "value", fmt)).lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format: {fmt!r} is not supported; expected one of {CHECKPOINT_FORMATS}")
        pack_dtype = d.get("pack_dtype")
        if pack_dtype is not None and str(pack_dtype).replace("torch.", "") != "int32":
            raise ValueError(f"pack_dtype: only 'int32' packing is supported, got {pack_dtype!r}")

        meta = d.get("meta") or {}
        if not isinstance(meta, Mapping):
            meta = {}

        def pick(key, default=None):
            if key in d and d[key] is not None:
                return d[key]
            if key in meta and meta[key] is not None:
                return meta[key]
            return default

        kwargs: Dict[str, Any] = {"checkpoint_format": fmt}
        for key in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                    "true_sequential", "lm_head", "model_seqlen", "block_size", "cache_block_outputs",
                    "clip_steps", "clip_min_ratio", "act_group_aware",
                    "modules_in_block_to_quantize"):
            v = pick(key)
            if v is not None:
                kwargs[key] = v
        if kwargs.get("desc_act") or kwargs.get("group_size") == -1:
            # A setting of the quantization run, not of the tensors' layout: a
            # writer that records it beside desc_act / per-channel grids loads.
            kwargs.pop("act_group_aware", None)  # the default (None) resolves to off here
        else:
            # Not recorded (AutoGPTQ, transformers, older writers): those tools had only the natural order.
            kwargs.setdefault("act_group_aware", False)
        kwargs.setdefault("clip_steps", 0)  # likewise: no other tool searches clipping ranges
        gptaq = meta.get("gptaq")  # GPTQModel's and gptqkit's spelling: {"alpha": a, ...} or None
        if isinstance(gptaq, Mapping):
            kwargs["gptaq"] = True
            alpha = gptaq.get("alpha")
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 < alpha <= 1.0:
                kwargs["gptaq_alpha"] = alpha  # another value is the other tool's business: it changes no tensor
        dyn = d.get("dynamic")
        if isinstance(dyn, Mapping) and dyn:
            # keep what decides the tensors' layout; drop other tools' extras (mse, adapters, ...)
            kwargs["dynamic"] = {k: ({kk: vv for kk, vv in v.items() if kk in OVERRIDE_KEYS or kk == "skip"}
                                     if isinstance(v, Mapping) else v)
                                 for k, v in dyn.items()}
        elif dyn:
            raise ValueError(f"dynamic: expected a dict of regex -> overrides, got {type(dyn).__name__}")
        return cls(**kwargs)

    def save(self, save_dir: Union[str, os.PathLike]) -> str:
        """Writes ``quantize_config.json`` (the :meth:`to_quantization_config` dict) into ``save_dir``.

        The file is written to a temporary name and renamed, so a crash never
        leaves a half-written file. Returns the file's path.
        """
        save_dir = os.fspath(save_dir)
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, QUANTIZE_CONFIG_FILE)
        fd, tmp = tempfile.mkstemp(prefix=".quantize_config.", suffix=".tmp", dir=save_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_quantization_config(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "QuantizeConfig":
        """Reads a config from a checkpoint folder (or a JSON file).

        In a folder, ``quantize_config.json`` is read, falling back to the
        ``quantization_config`` of ``config.json``. Any GPTQ tool's variant is
        accepted (see :meth:`from_quantization_config`).

        Raises:
            FileNotFoundError: neither file exists (or the path does not).
            ValueError: invalid JSON or invalid values.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            qc = os.path.join(path, QUANTIZE_CONFIG_FILE)
            if os.path.isfile(qc):
                return cls.from_quantization_config(_read_json(qc))
            cfg = os.path.join(path, "config.json")
            if os.path.isfile(cfg):
                data = _read_json(cfg)
                if isinstance(data, Mapping) and data.get("quantization_config") is not None:
                    return cls.from_quantization_config(data["quantization_config"])
            raise FileNotFoundError(f"{path}: no {QUANTIZE_CONFIG_FILE} and no quantization_config in config.json "
                                    f"(is this a GPTQ checkpoint?)")
        if os.path.isfile(path):
            data = _read_json(path)
            if isinstance(data, Mapping) and "quantization_config" in data and "bits" not in data:
                data = data["quantization_config"]
            return cls.from_quantization_config(data)
        raise FileNotFoundError(f"{path}: no such file or folder")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
