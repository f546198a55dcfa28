"""Mixture-of-Experts blocks as per-expert Linear layers, so that GPTQ can quantize the experts.

transformers 5 stores the experts of an MoE block in one module with two 3-D
parameters, ``gate_up_proj [experts, 2 * ffn, hidden]`` and ``down_proj
[experts, hidden, ffn]`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
GraniteMoE, PhiMoE, ...). GPTQ works on Linear layers, each with the Hessian of
*its own* inputs, and an expert only sees the tokens routed to it. So before
quantizing, :func:`defuse_experts` replaces each such module by a
:class:`LinearExperts`: one :class:`ExpertMLP` per expert, with ``gate_proj``,
``up_proj`` and ``down_proj`` ``nn.Linear`` layers holding the same values,
computing exactly what the fused module computes. The quantization pipeline
then treats every expert's layers like any other layer: hooks see only the
routed tokens, so each expert gets its own Hessian.

The layer names (``mlp.experts.3.gate_proj``) are those of the per-expert
checkpoints Qwen-MoE, OLMoE and DeepSeek publish and GPTQModel writes, and
:func:`gptqkit.checkpoint.load_checkpoint` defuses the model it builds when a
checkpoint stores its experts that way.

The variants transformers describes with ``use_experts_implementation`` flags
are split too:

* ``is_transposed`` (weights stored ``[experts, in, out]``): the per-expert
  weights are transposed views;
* ``has_bias`` (``gate_up_proj_bias``, ``down_proj_bias``): the Linear layers
  get the matching bias rows;
* a custom gating function (GPT-OSS: gate and up columns interleaved, clamped,
  ``(up + 1) * gate * sigmoid(alpha * gate)``): ``gate_proj`` holds the first
  half of the fused module's ``gate_up`` outputs and ``up_proj`` the second
  half, and the module's own ``_apply_gate`` runs on the two concatenated. For
  the standard layout the halves *are* the gate and the up projection; for
  GPT-OSS each half interleaves gate and up rows. It is the split GPTQModel
  7.7 (through ``defuser``) writes and reads, so checkpoints go both ways.
  GPTQ treats every output row on its own (the error feedback runs along the
  inputs of a row), so how rows are split between the two layers does not
  change the quantized values;
* ``has_gate=False`` (``up_proj`` and ``down_proj`` only, ``act_fn(up(x))``):
  experts without ``gate_proj``.

A norm after each expert (``has_post_expert_norm``) or other parameters are
not split; such modules stay fused, unquantized, and ``quantize()`` warns
about them (:func:`unsupported_reason` says why).

An expert that calibration routes no token to has an all-zero Hessian, on
which GPTQ would zero the whole weight (its dead-column rule); such layers are
rounded to nearest instead (GPTQ with an identity Hessian, which keeps the
clipping search), and the report lists them. Experts that get *few* tokens
still get GPTQ, on their rank-deficient but damped Hessian: measured on
SmolLM2-135M upcycled into a 4-expert MoE (``benchmarks/bench_moe_upcycled.py``),
rounding to nearest every expert layer with fewer tokens than input columns
gave a KL of 0.440 against 0.247 for GPTQ on them (one calibration window;
experts saw 3 to 505 tokens), and 0.292 against 0.208 with four windows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["ExpertMLP", "LinearExperts", "defuse", "defuse_experts", "fused_experts", "merge_expert_groups",
           "only_real_tokens", "routed_layers", "unsupported_reason"]

_FORWARD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, or ``down_proj(act_fn(up_proj(x)))``
    for experts without a gate (``gate_proj`` is then ``None``). The activation, or a custom
    gating function, lives on the parent :class:`LinearExperts`."""

    def __init__(self, gate_proj: Optional[nn.Linear], up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj


class LinearExperts(nn.Module):
    """The experts of an MoE block as one :class:`ExpertMLP` per expert (children ``"0"``,
    ``"1"``, ...), called like the fused experts module it replaced:
    ``forward(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``,
    positionally or by that module's own argument names.

    Attributes:
        num_experts: number of experts.
        act_fn: the activation (``act_fn(gate) * up``, or ``act_fn(up)`` without a gate).
        gate_fn: the fused module's custom gating function, bound to its settings, applied to
            ``cat([gate_proj(x), up_proj(x)], -1)``; ``None`` for the standard gate.
        routing_mask: while set (a bool ``[tokens]`` tensor, see
            :func:`only_real_tokens`), tokens where it is False are routed to
            no expert. Calibration sets it so that padding never reaches an
            expert's Hessian; it is ``None`` otherwise.
        fused_class: class name of the module this one replaced.
    """

    def __init__(self, experts: List[ExpertMLP], act_fn: Optional[nn.Module], fused_class: str = "",
                 gate_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 arg_names: Sequence[str] = _FORWARD_ARGS):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self.gate_fn = gate_fn
        self.fused_class = fused_class
        self.arg_names = tuple(arg_names)
        self.routing_mask: Optional[torch.Tensor] = None

    def __getitem__(self, index: int) -> ExpertMLP:
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert {index} out of range [0, {self.num_experts})")
        return self._modules[str(index)]

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self._modules[str(i)] for i in range(self.num_experts))

    def _bind(self, args, kwargs):
        if len(args) + len(kwargs) != 3:
            raise TypeError(f"{self.fused_class or 'experts'}: expected 3 arguments {self.arg_names}, "
                            f"got {len(args)} positional and {sorted(kwargs)}")
        values = list(args)
        for name in self.arg_names[len(args):]:
            key = name if name in kwargs else _FORWARD_ARGS[self.arg_names.index(name)]
            if key not in kwargs:
                raise TypeError(f"{self.fused_class or 'experts'}: missing argument {name!r}")
            values.append(kwargs[key])
        return values

    def hidden(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        """The expert's activations before ``down_proj``."""
        if expert.gate_proj is None:
            return self.act_fn(expert.up_proj(x))
        gate, up = expert.gate_proj(x), expert.up_proj(x)
        if self.gate_fn is not None:
            return self.gate_fn(torch.cat([gate, up], dim=-1))
        return self.act_fn(gate) * up

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden_states, top_k_index, top_k_weights = self._bind(args, kwargs)
        out = torch.zeros_like(hidden_states)
        if self.routing_mask is not None:
            keep = self.routing_mask.to(top_k_index.device).reshape(-1, 1)
            top_k_index = top_k_index.masked_fill(~keep, self.num_experts)  # "no expert"
        with torch.no_grad():
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts + 1)[:self.num_experts]
            hit = counts.nonzero().flatten().tolist()
        for e in hit:
            expert = self[e]
            # the fused module's order: by top-k position, then token (same index_add_ sums)
            top_k_pos, token_idx = torch.where((top_k_index == e).t())
            y = expert.down_proj(self.hidden(expert, hidden_states[token_idx]))
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as gate
    except Exception:  # older or reorganised transformers: no standard gate to compare with
        return None
    return gate


def _custom_gate(module: nn.Module):
    """The module's ``_apply_gate`` when it is not transformers' standard ``act_fn(gate) * up``."""
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None or gate is _default_apply_gate():
        return None
    return gate


def _bound_gate(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's custom gating function bound to a copy of its settings (``alpha``, ``limit``,
    ``act_fn``, ...), so that the fused module, and the weights it holds, can go."""
    settings = types.SimpleNamespace(**{k: v for k, v in vars(module).items() if not k.startswith("_")})
    for name, child in module._modules.items():
        setattr(settings, name, child)
    return functools.partial(_custom_gate(module), settings)


def _forward_arg_names(module: nn.Module) -> Optional[List[str]]:
    try:
        return list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return None


def _layout(module: nn.Module) -> dict:
    has_gate = bool(getattr(module, "has_gate", "gate_up_proj" in module._parameters))
    return {"has_gate": has_gate, "transposed": bool(getattr(module, "is_transposed", False)),
            "has_bias": bool(getattr(module, "has_bias", False)),
            "input": "gate_up_proj" if has_gate else "up_proj"}


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a transformers fused-experts module) cannot be defused, or ``None`` when it can."""
    params = dict(module.named_parameters(recurse=False))
    lay = _layout(module)
    names = [lay["input"], "down_proj"]
    expected = set(names) | ({f"{n}_bias" for n in names} if lay["has_bias"] else set())
    if set(params) != expected:
        return f"parameters {sorted(params)}, not {sorted(expected)}"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert (has_post_expert_norm)"
    inp, down = params[lay["input"]], params["down_proj"]
    if inp.dim() != 3 or down.dim() != 3 or inp.shape[0] != down.shape[0]:
        return f"{lay['input']} {list(inp.shape)} and down_proj {list(down.shape)} are not 3-D, one matrix per expert"
    # [E, out, in] (or [E, in, out] transposed): input projection H -> (2)I, down I -> H
    i_out, i_in = (2, 1) if lay["transposed"] else (1, 2)
    hidden, ffn = inp.shape[i_in], down.shape[i_in]
    width = 2 * ffn if lay["has_gate"] else ffn
    if inp.shape[i_out] != width or down.shape[i_out] != hidden:
        order = "[E, in, out]" if lay["transposed"] else "[E, out, in]"
        return (f"{lay['input']} {list(inp.shape)} and down_proj {list(down.shape)} do not chain as {order} "
                f"(hidden {hidden}, ffn {ffn})")
    if lay["has_bias"]:
        ib, db = params[f"{lay['input']}_bias"], params["down_proj_bias"]
        if tuple(ib.shape) != (inp.shape[0], width) or tuple(db.shape) != (inp.shape[0], hidden):
            return f"biases {list(ib.shape)} and {list(db.shape)} do not match the weights"
    custom = lay["has_gate"] and _custom_gate(module) is not None
    if not custom and not isinstance(getattr(module, "act_fn", None), nn.Module):
        return "no act_fn module"
    if lay["has_gate"] and not custom and not getattr(module, "is_concatenated", True):
        return "interleaved gate and up rows with the standard gate"
    names = _forward_arg_names(module)
    if names is None or len(names) != 3:
        return f"forward takes {names}, not 3 arguments like {list(_FORWARD_ARGS)}"
    # without use_experts_implementation's flags, only the standard interface is known to route alike
    if not hasattr(module, "has_gate") and names != list(_FORWARD_ARGS):
        return f"forward takes {names}, not {list(_FORWARD_ARGS)}"
    return None


def fused_experts(model: nn.Module) -> Dict[str, nn.Module]:
    """transformers' fused-experts modules in ``model`` (those with 3-D ``down_proj`` and
    ``gate_up_proj`` or ``up_proj`` parameters), by dotted name, supported or not."""
    out = {}
    for name, module in model.named_modules():
        p = module._parameters
        if isinstance(p.get("down_proj"), torch.Tensor) and p["down_proj"].dim() == 3 and (
                "gate_up_proj" in p or isinstance(p.get("up_proj"), torch.Tensor) and p["up_proj"].dim() == 3):
            out[name] = module
    return out


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    n, k = weight.shape
    layer = nn.Linear(k, n, bias=bias is not None, device="meta", dtype=weight.dtype)
    # Views, not copies: an expert's rows are slices of the fused tensors (transposed ones for
    # is_transposed layouts), so splitting costs no memory (a copy doubled one block's experts for
    # a moment: 1.2 GB for 64 experts of 2048 x 768). The fused storage goes with the last view.
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def defuse(module: nn.Module) -> LinearExperts:
    """The :class:`LinearExperts` equivalent of one supported fused-experts module. Its weights
    are views of the fused tensors (no copy); a module on the meta device gives one on the meta
    device."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"{type(module).__name__} cannot be split into per-expert layers: {reason}")
    lay = _layout(module)
    inp, down = getattr(module, lay["input"]), module.down_proj
    in_bias = getattr(module, f"{lay['input']}_bias") if lay["has_bias"] else None
    down_bias = module.down_proj_bias if lay["has_bias"] else None

    def rows(t, e):  # expert e's weight as [out, in]
        return t[e].t() if lay["transposed"] else t[e]

    ffn = rows(down, 0).shape[1]
    experts = []
    for e in range(inp.shape[0]):
        w_in, b_in = rows(inp, e), in_bias[e] if in_bias is not None else None
        down_proj = _linear(rows(down, e), down_bias[e] if down_bias is not None else None)
        if lay["has_gate"]:
            gate = _linear(w_in[:ffn], b_in[:ffn] if b_in is not None else None)
            up = _linear(w_in[ffn:], b_in[ffn:] if b_in is not None else None)
            experts.append(ExpertMLP(gate, up, down_proj))
        else:
            experts.append(ExpertMLP(None, _linear(w_in, b_in), down_proj))
    custom = lay["has_gate"] and _custom_gate(module) is not None
    act_fn = getattr(module, "act_fn", None)
    return LinearExperts(experts, act_fn if isinstance(act_fn, nn.Module) else None, type(module).__name__,
                         gate_fn=_bound_gate(module) if custom else None,
                         arg_names=_forward_arg_names(module) or _FORWARD_ARGS)


def defuse_experts(model: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> List[str]:
    """Replaces every supported fused-experts module of ``model`` by its :class:`LinearExperts`,
    one module at a time, without copying weights. ``keep(name)`` True leaves a
    module fused. Returns the names replaced; unsupported modules are left as they are
    (:func:`unsupported_reason` says why)."""
    done = []
    for name in list(fused_experts(model)):
        module = model.get_submodule(name)
        if not name or keep(name) or unsupported_reason(module) is not None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, defuse(module))
        done.append(name)
    return done


def routed_layers(block: nn.Module) -> Dict[str, str]:
    """The Linear layers inside the block's :class:`LinearExperts`: relative dotted name ->
    the container's relative name."""
    out = {}
    for path, module in block.named_modules():
        if isinstance(module, LinearExperts):
            for sub, layer in module.named_modules():
                if isinstance(layer, nn.Linear):
                    out[f"{path}.{sub}" if path else sub] = path
    return out


def merge_expert_groups(block: nn.Module, groups: List[List[str]], not_executed: List[str]) -> List[List[str]]:
    """True-sequential groups with the experts of a :class:`LinearExperts` quantized together.

    Traced groups put each expert's ``gate_proj``/``up_proj`` and its
    ``down_proj`` in groups of their own (2 groups per expert, so the block
    would run 2E times). But an expert's inputs do not depend on the other
    experts' quantization, so every expert's gate/up forms one group, placed
    where the first traced expert's was, and every ``down_proj`` the next; an
    expert that calibration's first batch did not reach joins its group too.
    Other layers keep their groups; layers that never ran end the list.
    """
    routed = routed_layers(block)
    if not routed:
        return [list(g) for g in groups] + ([list(not_executed)] if not_executed else [])

    def stage(name):
        return routed[name], "down" if name.endswith(".down_proj") else "in"

    members: Dict[tuple, List[str]] = {}
    for name in routed:  # registration order: expert 0 gate, up, down, expert 1 ...
        members.setdefault(stage(name), []).append(name)
    out, placed = [], set()
    for group in groups:
        plain = [n for n in group if n not in routed]
        if plain:
            out.append(plain)
        for key in dict.fromkeys(stage(n) for n in group if n in routed):
            if key not in placed:
                placed.add(key)
                out.append(list(members[key]))
    # stages no expert reached on the first batch: gate/up before down
    for key in sorted(set(members) - placed, key=lambda k: (k[0], k[1] == "down")):
        out.append(list(members[key]))
    rest = [n for n in not_executed if n not in routed]
    if rest:
        out.append(rest)
    return out


@contextlib.contextmanager
def only_real_tokens(block: nn.Module, mask: Optional[torch.Tensor]):
    """Within the context, the block's :class:`LinearExperts` route no padded token (``mask`` 0)
    to any expert. Padding then reaches no expert's Hessian, and only padded positions'
    outputs change. No-op when ``mask`` is ``None`` or all ones."""
    experts = [m for m in block.modules() if isinstance(m, LinearExperts)]
    if not experts or mask is None or bool(mask.all()):
        yield
        return
    flat = mask.reshape(-1).bool()
    for m in experts:
        m.routing_mask = flat
    try:
        yield
    finally:
        for m in experts:
            m.routing_mask = None
