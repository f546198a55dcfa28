"""Model structure discovery for GPTQ, without per-model tables.

GPTQ quantizes a decoder block by block, and inside a block layer group by
layer group ("true sequential": q/k/v first, then the attention output
projection with inputs recomputed from the already quantized q/k/v, then the
MLP's input projections, then its output projection). This module finds that
structure in any Hugging Face causal LM:

* **The repeated blocks**: the ``torch.nn.ModuleList`` whose children are all
  of one class and contain Linear-like layers. Lists nested inside another such
  list's children (e.g. the experts of an MoE block) are ignored; of the rest,
  the longest wins (ties: the shallowest path). Its dotted path is reported
  (``"model.layers"``, ``"transformer.h"``, ``"model.decoder.layers"``, ...).
* **What runs before the blocks** (token and position embeddings, the rotary
  embedding module, dropout) **and after them** (final norm, ``lm_head``): the
  modules beside the path to the block list, split by a cheap traced forward of
  two dummy tokens that stops at the first block (falls back to a type-based
  guess when that forward fails, e.g. on a meta-device model).
* **The Linear-like layers of a block**: ``torch.nn.Linear`` (and subclasses)
  and transformers' ``Conv1D`` (GPT-2 family; its weight is stored ``[in,
  out]``: use :func:`get_weight` / :func:`set_weight`, which always speak
  ``[out, in]``).
* **The true-sequential groups**: recorded with forward pre-hooks during one
  real forward through a block (:class:`LayerTracer`, :func:`trace_groups`).
  Layers whose input is the very same tensor (same storage, shape, strides and
  version, e.g. q/k/v, gate/up, or Phi's parallel q/k/v/fc1) form one group;
  groups are ordered by the first execution of any member, members by
  execution order. MoE experts, once split into per-expert layers
  (:mod:`gptqkit.moe`), form two groups: every expert's gate/up, then every
  expert's down projection.

Example::

    from gptqkit.discovery import find_layout, trace_groups
    layout = find_layout(model)                # static: blocks, pre/post modules
    layout.blocks_path                         # "model.layers"
    layout.linear_names                        # ["self_attn.q_proj", ..., "mlp.down_proj"]
    groups = trace_groups(model, input_ids)    # one forward, stops after block 0
    # [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    #  ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]

In an orchestrator that already runs block 0 on captured inputs, record the
groups on that first pass instead of running the model again::

    block = layout.blocks(model)[0]
    with LayerTracer(block) as tracer:
        block(*args, **kwargs)                 # the first calibration batch
    groups = tracer.groups()

Explicit override, for models that discovery gets wrong (names are relative to
one block; every name must be a Linear-like layer of the block)::

    from gptqkit.discovery import ModelLayout, find_layout
    layout = find_layout(model, ModelLayout(
        blocks_path="model.layers",
        groups=[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"],
                ["mlp.down_proj"]],
    ))
    layout.groups                              # used as given, no tracing needed

``pre_modules`` / ``post_modules`` may be given in the override as well; those
left as ``None`` are discovered.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gptqkit.moe import merge_expert_groups, routed_layers

__all__ = [
    "LayerTracer",
    "ModelLayout",
    "UnsupportedModelError",
    "find_blocks",
    "find_layout",
    "find_linear_layers",
    "get_weight",
    "is_conv1d",
    "is_linear_like",
    "layer_shape",
    "set_weight",
    "trace_groups",
    "validate_groups",
]

_OVERRIDE_HINT = (
    "Pass an explicit layout, e.g. find_layout(model, ModelLayout(blocks_path=\"model.layers\", "
    "groups=[[\"self_attn.q_proj\", \"self_attn.k_proj\", \"self_attn.v_proj\"], [\"self_attn.o_proj\"], "
    "[\"mlp.gate_proj\", \"mlp.up_proj\"], [\"mlp.down_proj\"]])) "
    "(GPTQForCausalLM accepts the same object as layout=...)."
)


class UnsupportedModelError(ValueError):
    """Discovery could not make sense of the model; the message says how to override it."""


# --------------------------------------------------------------------------- layers

def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or reorganised
        return None
    return Conv1D


_CONV1D = _conv1d_class()


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored ``[in, out]``)."""
    return _CONV1D is not None and isinstance(module, _CONV1D)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``torch.nn.Linear`` (and subclasses) and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_shape(layer: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like layer."""
    if is_conv1d(layer):
        k, n = layer.weight.shape
        return int(n), int(k)
    if isinstance(layer, nn.Linear):
        return int(layer.out_features), int(layer.in_features)
    raise TypeError(f"{type(layer).__name__} is not a Linear-like layer (nn.Linear or transformers Conv1D)")


def get_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """The weight of a Linear-like layer as a new contiguous ``[out_features, in_features]`` tensor.

    ``Conv1D`` weights (stored ``[in, out]``) are transposed. The result is
    detached and never aliases the parameter, so it can be modified freely;
    ``dtype``/``device`` convert it on the way (e.g. ``torch.float32`` for the
    native solver).
    """
    w = layer.weight.detach()
    if is_conv1d(layer):
        w = w.t()
    elif not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(layer).__name__} is not a Linear-like layer (nn.Linear or transformers Conv1D)")
    out = w.to(dtype=dtype or w.dtype, device=device or w.device, copy=True)
    return out.contiguous()


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Writes ``weight [out_features, in_features]`` into a Linear-like layer, in place.

    The values are converted to the parameter's dtype and device and stored in
    the layer's own layout (transposed for ``Conv1D``).

    Raises:
        ValueError: ``weight`` does not have the layer's ``[out, in]`` shape.
    """
    n, k = layer_shape(layer)
    if tuple(weight.shape) != (n, k):
        raise ValueError(f"weight: expected shape [{n}, {k}] ([out_features, in_features]) for "
                         f"{type(layer).__name__}, got {list(weight.shape)}")
    with torch.no_grad():
        if is_conv1d(layer):
            layer.weight.copy_(weight.t())
        else:
            layer.weight.copy_(weight)


def find_linear_layers(module: nn.Module) -> Dict[str, nn.Module]:
    """Linear-like layers inside ``module``, by dotted name relative to it, in registration order."""
    return {name: m for name, m in module.named_modules() if name and is_linear_like(m)}


def weights_outside_linear_layers(module: nn.Module) -> List[Tuple[str, Tuple[int, ...], int]]:
    """Matrix-shaped parameters (2-D or more) of ``module`` that no Linear-like layer
    owns, as ``(dotted name, shape, numel)``: what GPTQ cannot quantize here, e.g.
    the expert weights transformers 5 fuses into 3-D tensors in MoE blocks
    (``mlp.experts.gate_up_proj`` ``[experts, 2 * ffn, hidden]``), or an MoE
    router's ``[experts, hidden]`` matrix."""
    owned = {id(p) for layer in find_linear_layers(module).values() for p in layer.parameters()}
    return [(name, tuple(p.shape), p.numel()) for name, p in module.named_parameters()
            if p.dim() >= 2 and id(p) not in owned]


# --------------------------------------------------------------------------- blocks

def _is_block_list(ml: nn.Module) -> bool:
    if not isinstance(ml, nn.ModuleList) or len(ml) == 0:
        return False
    children = list(ml)
    cls = type(children[0])
    if any(type(c) is not cls for c in children):
        return False
    if is_linear_like(children[0]):      # a list of bare layers is not a list of blocks
        return False
    return all(find_linear_layers(c) for c in children)


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """Finds the decoder's repeated blocks; returns ``(dotted_path, module_list)``.

    Candidates are ``nn.ModuleList`` s of one class of non-Linear modules, each
    containing Linear-like layers. Candidates inside another candidate's
    children are dropped (MoE experts, per-block sub-lists); the longest
    remaining list wins, ties going to the shallowest path.

    Raises:
        UnsupportedModelError: no candidate (the message shows the override).
    """
    cands = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    outer = [(name, m) for name, m in cands
             if not any(other != name and name.startswith(other + ".") for other, _ in cands)]
    if not outer:
        raise UnsupportedModelError(
            f"could not find the repeated decoder blocks of {type(model).__name__}: no torch.nn.ModuleList "
            f"of identical blocks containing nn.Linear/Conv1D layers. {_OVERRIDE_HINT}")
    outer.sort(key=lambda nm: (-len(nm[1]), nm[0].count("."), nm[0]))
    return outer[0]


# --------------------------------------------------------------------------- layout

@dataclass
class ModelLayout:
    """Where things are in a causal LM, as GPTQ needs it.

    Give ``blocks_path`` (and optionally ``groups``, ``pre_modules``,
    ``post_modules``) to override discovery; :func:`find_layout` fills in the
    rest and validates the override.

    Attributes:
        blocks_path: dotted path of the ``nn.ModuleList`` of decoder blocks.
        groups: true-sequential groups of Linear-like layer names relative to a
            block, in the order to quantize them; ``None`` until traced
            (:func:`trace_groups`) or given.
        pre_modules: dotted names of the modules outside the blocks that run
            before them (embeddings, rotary embedding, dropout), in execution order.
        post_modules: dotted names of those that run after them (final norm,
            output projection), in order.
        linear_names: all Linear-like layers of the first block, relative names,
            in registration order.
        num_blocks: number of blocks.
        block_class: class name of the blocks.
        lm_head_name: dotted name of the output projection
            (``model.get_output_embeddings()``) when it is a Linear-like layer.
        tied_lm_head: whether the output projection shares its weight with the
            input embedding.
    """

    blocks_path: str
    groups: Optional[List[List[str]]] = None
    pre_modules: Optional[List[str]] = None
    post_modules: Optional[List[str]] = None
    linear_names: List[str] = field(default_factory=list)
    num_blocks: int = 0
    block_class: str = ""
    lm_head_name: Optional[str] = None
    tied_lm_head: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The block list of ``model``."""
        return _get_submodule(model, self.blocks_path, "blocks_path")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict of all fields."""
        return {
            "blocks_path": self.blocks_path,
            "groups": [list(g) for g in self.groups] if self.groups is not None else None,
            "pre_modules": list(self.pre_modules) if self.pre_modules is not None else None,
            "post_modules": list(self.post_modules) if self.post_modules is not None else None,
            "linear_names": list(self.linear_names),
            "num_blocks": self.num_blocks,
            "block_class": self.block_class,
            "lm_head_name": self.lm_head_name,
            "tied_lm_head": self.tied_lm_head,
        }


def _get_submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise UnsupportedModelError(f"{what}: {type(model).__name__} has no submodule {path!r}. "
                                    f"{_OVERRIDE_HINT}") from None


def validate_groups(block: nn.Module, groups: Sequence[Sequence[str]], what: str = "groups") -> List[List[str]]:
    """Checks layer groups against ``block`` and returns them as lists.

    Every name must be a Linear-like layer of ``block`` (relative dotted name),
    no group may be empty and no name may appear twice.

    Raises:
        ValueError: naming the offending entry and listing the block's layers.
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(f"{what}: expected a list of lists of layer names, got {type(groups).__name__}")
    linears = find_linear_layers(block)
    seen = set()
    out = []
    for i, g in enumerate(groups):
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) == 0:
            raise ValueError(f"{what}[{i}]: expected a non-empty list of layer names, got {g!r}")
        for name in g:
            if name not in linears:
                raise ValueError(f"{what}[{i}]: {name!r} is not a Linear-like layer of the block "
                                 f"({type(block).__name__}); its layers are {list(linears)}")
            if name in seen:
                raise ValueError(f"{what}[{i}]: {name!r} appears more than once")
            seen.add(name)
        out.append(list(g))
    return out


def _outside_modules(model: nn.Module, blocks_path: str) -> List[Tuple[str, int, int]]:
    """Modules beside the path from the root to the block list.

    Returns ``(dotted_name, depth, registration_index)``: the children of each
    ancestor of the block list that are not on the path themselves.
    """
    parts = blocks_path.split(".") if blocks_path else []
    out = []
    prefix = ""
    mod = model
    for depth, part in enumerate(parts):
        for idx, (name, child) in enumerate(mod.named_children()):
            if name == part or child is None:
                continue
            out.append((prefix + name, depth, idx))
        mod = getattr(mod, part)
        prefix = prefix + part + "."
    return out


class _StopForward(Exception):
    pass


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _classify_outside(model: nn.Module, blocks: nn.ModuleList, outside: List[Tuple[str, int, int]],
                      example_input_ids: Optional[torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Splits the outside modules into (pre, post), tracing a forward up to block 0 when possible."""
    names = [n for n, _, _ in outside]
    executed: List[str] = []
    handles = []

    def mark(name):
        def hook(_mod, _args):
            if name not in executed:
                executed.append(name)
        return hook

    def stop(_mod, _args, _kwargs):
        raise _StopForward

    traced = False
    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(mark(n)))
        handles.append(blocks[0].register_forward_pre_hook(stop, with_kwargs=True))
        ids = example_input_ids
        if ids is None:
            ids = torch.full((1, 2), 0, dtype=torch.long, device=_model_device(model))
        with torch.no_grad():
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _StopForward:
                traced = True
    except Exception:
        traced = False
    finally:
        for h in handles:
            h.remove()

    if not traced:
        return _classify_outside_static(model, outside)
    pre = list(executed)
    pre_set = set(pre)
    # after the blocks, inner modules finish before outer ones (norm before lm_head)
    rest = sorted(((n, d, i) for n, d, i in outside if n not in pre_set), key=lambda t: (-t[1], t[2]))
    return pre, [n for n, _, _ in rest]


def _classify_outside_static(model: nn.Module, outside: List[Tuple[str, int, int]]) -> Tuple[List[str], List[str]]:
    """Type-based guess: embeddings and rotary/positional modules run before the blocks, the rest after."""
    pre = []
    for n, _, _ in outside:
        m = model.get_submodule(n)
        cls = type(m).__name__.lower()
        if isinstance(m, nn.Embedding) or "rotary" in cls or "positional" in cls or "embedding" in cls:
            pre.append(n)
    pre_set = set(pre)
    rest = sorted(((n, d, i) for n, d, i in outside if n not in pre_set), key=lambda t: (-t[1], t[2]))
    return pre, [n for n, _, _ in rest]


def _lm_head_name(model: nn.Module) -> Tuple[Optional[str], bool]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or not is_linear_like(head):
        return None, False
    name = next((n for n, m in model.named_modules() if m is head), None)
    tied = False
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied = head.weight is emb.weight
    return name, tied


def find_layout(model: nn.Module, override: Optional[ModelLayout] = None, *,
                example_input_ids: Optional[torch.Tensor] = None, trace_pre: bool = True) -> ModelLayout:
    """Discovers (or completes and validates) the layout of a causal LM.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``) or any
            ``nn.Module`` with a list of repeated blocks.
        override: a :class:`ModelLayout` naming ``blocks_path`` (and optionally
            ``groups``, ``pre_modules``, ``post_modules``); its given fields are
            validated and kept, the others discovered.
        example_input_ids: token ids for the short traced forward that tells
            which outside modules run before the blocks (default: two zeros).
        trace_pre: set ``False`` to skip that forward and use the type-based guess.

    Returns:
        A complete :class:`ModelLayout`; ``groups`` stays ``None`` unless given
        (trace them with :func:`trace_groups` or :class:`LayerTracer`).

    Raises:
        UnsupportedModelError: no repeated blocks, a wrong ``blocks_path``, or
            blocks without Linear-like layers (each message shows the override).
        ValueError: override groups naming unknown layers.
    """
    if override is not None:
        if not isinstance(override, ModelLayout):
            raise TypeError(f"override: expected a ModelLayout, got {type(override).__name__}")
        path = override.blocks_path
        blocks = _get_submodule(model, path, "blocks_path")
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(f"blocks_path: {path!r} of {type(model).__name__} is a "
                                        f"{type(blocks).__name__}, not a non-empty nn.ModuleList of blocks")
        if not find_linear_layers(blocks[0]):
            raise UnsupportedModelError(f"blocks_path: the blocks at {path!r} contain no nn.Linear/Conv1D layers")
    else:
        path, blocks = find_blocks(model)

    groups = None
    if override is not None and override.groups is not None:
        groups = validate_groups(blocks[0], override.groups, "groups")

    pre = list(override.pre_modules) if override is not None and override.pre_modules is not None else None
    post = list(override.post_modules) if override is not None and override.post_modules is not None else None
    for what, lst in (("pre_modules", pre), ("post_modules", post)):
        for n in lst or []:
            _get_submodule(model, n, what)
    if pre is None or post is None:
        outside = _outside_modules(model, path)
        if trace_pre:
            dpre, dpost = _classify_outside(model, blocks, outside, example_input_ids)
        else:
            dpre, dpost = _classify_outside_static(model, outside)
        pre = dpre if pre is None else pre
        post = dpost if post is None else post

    lm_head, tied = _lm_head_name(model)
    return ModelLayout(
        blocks_path=path,
        groups=groups,
        pre_modules=pre,
        post_modules=post,
        linear_names=list(find_linear_layers(blocks[0])),
        num_blocks=len(blocks),
        block_class=type(blocks[0]).__name__,
        lm_head_name=lm_head,
        tied_lm_head=tied,
    )


# --------------------------------------------------------------------------- tracing

def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.device.type, x.device.index, x.data_ptr(), tuple(x.shape), tuple(x.stride()),
            x.dtype, x._version)


class LayerTracer:
    """Records the order in which a block's Linear-like layers run, and their shared inputs.

    Use as a context manager around one forward of the block (or of the whole
    model while the block runs). Only each layer's first call is recorded, so
    it may stay active over several batches. Input tensors are kept referenced
    until the context exits, so that a freed tensor's memory cannot be reused
    by a later input and fake a shared input.

    Args:
        block: the module whose layers to trace (a decoder block).
        layer_names: restrict to these relative names (default: all
            Linear-like layers of ``block``).

    Attributes:
        order: names in first-execution order.
        not_executed: traced layers that never ran (e.g. unrouted MoE experts).
    """

    def __init__(self, block: nn.Module, layer_names: Optional[Iterable[str]] = None):
        self.block = block
        linears = find_linear_layers(block)
        if layer_names is None:
            self.layers = linears
        else:
            names = list(layer_names)
            unknown = [n for n in names if n not in linears]
            if unknown:
                raise ValueError(f"layer_names: {unknown} are not Linear-like layers of {type(block).__name__}; "
                                 f"its layers are {list(linears)}")
            self.layers = {n: linears[n] for n in names}
        self.order: List[str] = []
        self._input_key: Dict[str, tuple] = {}
        self._keep: List[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def hook(_mod, args, kwargs):
            if name in self._input_key:
                return None
            x = _first_tensor(args, kwargs)
            self.order.append(name)
            if x is None:
                self._input_key[name] = ("no-tensor", name)
            else:
                self._input_key[name] = _tensor_key(x)
                self._keep.append(x)
            return None
        return hook

    def __enter__(self) -> "LayerTracer":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._keep.clear()

    @property
    def not_executed(self) -> List[str]:
        return [n for n in self.layers if n not in self._input_key]

    def groups(self) -> List[List[str]]:
        """True-sequential groups: layers sharing one input tensor, by first execution.

        Layers that never ran are left out (see :attr:`not_executed`).
        """
        groups: Dict[tuple, List[str]] = {}
        for name in self.order:
            groups.setdefault(self._input_key[name], []).append(name)
        return list(groups.values())


def trace_groups(model: nn.Module, input_ids: torch.Tensor, layout: Optional[ModelLayout] = None,
                 attention_mask: Optional[torch.Tensor] = None, block_index: int = 0,
                 **forward_kwargs) -> List[List[str]]:
    """Runs ``model`` on ``input_ids`` up to the end of block ``block_index`` and returns its layer groups.

    The forward is stopped right after that block, so later blocks and the
    output head do not run. The experts of a split MoE block
    (:class:`gptqkit.moe.LinearExperts`) are grouped by stage, all their
    gate/up layers then all their down layers
    (:func:`gptqkit.moe.merge_expert_groups`), reached by the input or not.
    Other layers that did not run are appended as one last group with a
    warning (they would get no calibration data).

    Args:
        model: the causal LM.
        input_ids: ``[batch, seq]`` token ids (a short real or random sequence is enough).
        layout: from :func:`find_layout` (discovered when ``None``).
        attention_mask: optional mask passed to the model.
        block_index: which block to trace (blocks are identical; 0 is cheapest).
        **forward_kwargs: extra keyword arguments for ``model(...)``.
    """
    layout = layout or find_layout(model)
    block = layout.blocks(model)[block_index]

    def stop(_mod, _args, _kwargs, _out):
        raise _StopForward

    tracer = LayerTracer(block)
    handle = block.register_forward_hook(stop, with_kwargs=True)
    kwargs = dict(forward_kwargs)
    kwargs.setdefault("use_cache", False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    try:
        with tracer, torch.no_grad():
            try:
                model(input_ids=input_ids, **kwargs)
            except _StopForward:
                pass
        groups = tracer.groups()
        missing = tracer.not_executed
    finally:
        handle.remove()
    if not groups:
        raise UnsupportedModelError(f"none of the Linear-like layers of block {block_index} "
                                    f"({layout.blocks_path}) ran during the forward. {_OVERRIDE_HINT}")
    routed = routed_layers(block)
    unrouted = [n for n in missing if n not in routed]  # an expert the input was not routed to is normal
    if unrouted:
        warnings.warn(f"layers {unrouted} of {layout.block_class} did not run on the example input; "
                      f"they are put in a last group of their own", stacklevel=2)
    return merge_expert_groups(block, groups, missing)
