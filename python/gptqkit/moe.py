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

Only the standard layout is defused: concatenated ``[gate; up]`` rows, not
transposed, no biases, the default ``act_fn(gate) * up`` gating, no
post-expert norm. Others (GPT-OSS: interleaved, transposed, with biases and a
clamped gate) are left fused, unquantized, and ``quantize()`` warns about them.

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
import inspect
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["ExpertMLP", "LinearExperts", "defuse", "defuse_experts", "fused_experts", "merge_expert_groups",
           "only_real_tokens", "routed_layers", "unsupported_reason"]

_STANDARD_FLAGS = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True,
                   "has_post_expert_norm": False}
_FORWARD_ARGS = ["hidden_states", "top_k_index", "top_k_weights"]


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (the activation lives on the
    parent :class:`LinearExperts`)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj


class LinearExperts(nn.Module):
    """The experts of an MoE block as one :class:`ExpertMLP` per expert (children ``"0"``,
    ``"1"``, ...), called like transformers' fused experts module:
    ``forward(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``.

    Attributes:
        num_experts: number of experts.
        routing_mask: while set (a bool ``[tokens]`` tensor, see
            :func:`only_real_tokens`), tokens where it is False are routed to
            no expert. Calibration sets it so that padding never reaches an
            expert's Hessian; it is ``None`` otherwise.
        fused_class: class name of the module this one replaced.
    """

    def __init__(self, experts: List[ExpertMLP], act_fn: nn.Module, fused_class: str = ""):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self.fused_class = fused_class
        self.routing_mask: Optional[torch.Tensor] = None

    def __getitem__(self, index: int) -> ExpertMLP:
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert {index} out of range [0, {self.num_experts})")
        return self._modules[str(index)]

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self._modules[str(i)] for i in range(self.num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
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
            x = hidden_states[token_idx]
            h = self.act_fn(expert.gate_proj(x)) * expert.up_proj(x)
            y = expert.down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as gate
    except Exception:  # older or reorganised transformers: no standard gate to compare with
        return None
    return gate


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a transformers fused-experts module) cannot be defused, or ``None`` when it can."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"parameters {sorted(params)}, not gate_up_proj and down_proj"
    for flag, standard in _STANDARD_FLAGS.items():
        if getattr(module, flag, standard) != standard:
            return f"{flag}={getattr(module, flag)}"
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0] or gu.shape[1] % 2:
        return f"gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} are not [E, 2I, H] and [E, H, I]"
    if down.shape[1] != gu.shape[2] or down.shape[2] * 2 != gu.shape[1]:
        return f"gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} are not [E, 2I, H] and [E, H, I]"
    if not isinstance(getattr(module, "act_fn", None), nn.Module):
        return "no act_fn module"
    standard_gate = _default_apply_gate()
    gate = getattr(type(module), "_apply_gate", None)
    if standard_gate is None or gate is not standard_gate:
        return "a custom gating function"
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        names = []
    if names != _FORWARD_ARGS:
        return f"forward takes {names}, not {_FORWARD_ARGS}"
    return None


def fused_experts(model: nn.Module) -> Dict[str, nn.Module]:
    """transformers' fused-experts modules in ``model`` (those with 3-D ``gate_up_proj`` /
    ``down_proj`` parameters), by dotted name, supported or not."""
    out = {}
    for name, module in model.named_modules():
        p = module._parameters
        if isinstance(p.get("down_proj"), torch.Tensor) and p["down_proj"].dim() == 3 and "gate_up_proj" in p:
            out[name] = module
    return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    n, k = weight.shape
    layer = nn.Linear(k, n, bias=False, device="meta", dtype=weight.dtype)
    # A view, not a copy: an expert's gate, up and down rows are contiguous slices of the fused
    # tensors, so splitting costs no memory (a copy doubled one block's experts for a moment:
    # 1.2 GB for 64 experts of 2048 x 768). The fused storage goes with the last view of it.
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return layer


def defuse(module: nn.Module) -> LinearExperts:
    """The :class:`LinearExperts` equivalent of one supported fused-experts module. Its weights
    are views of the fused tensors (no copy); a module on the meta device gives one on the meta
    device."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"{type(module).__name__} cannot be split into per-expert layers: {reason}")
    gu, down = module.gate_up_proj, module.down_proj
    ffn = down.shape[2]
    experts = [ExpertMLP(_linear(gu[e, :ffn]), _linear(gu[e, ffn:]), _linear(down[e]))
               for e in range(gu.shape[0])]
    return LinearExperts(experts, module.act_fn, type(module).__name__)


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
