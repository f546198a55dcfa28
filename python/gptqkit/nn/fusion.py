"""One GEMM for sibling quantized layers that read the same input (q/k/v, gate/up).

Decoding calls every linear layer once per token with a handful of rows, so
each call's fixed cost counts: on a GPU the launch, the split-K reduction and
the pipeline fill before the weight streams; on the CPU the module call and
the hand-over to the kernel (tens of microseconds on a 2-core machine). In a
Llama-style block five of the seven projections read one of only two
tensors: ``q_proj``, ``k_proj`` and ``v_proj`` the normalised hidden state,
``gate_proj`` and ``up_proj`` the MLP's input. :func:`fuse_projections`
concatenates such siblings' packed tensors along the output dimension into
one :class:`FusedQuantLinear` (a block then runs 4 quantized GEMMs instead of
7) and leaves the model's code alone: each sibling becomes a
:class:`FusedProjection` that hands back its columns of the fused output.

**Which layers.** Siblings (quantized children of one module) that received
the very same input tensor object in every call of a probe forward pass, and
that can share a GEMM (same bits, group size, zero-point format, input size,
``g_idx``, dtypes and device). Nothing is guessed from layer names, so the
q/k/v of self-attention fuse while the q and k/v of a cross-attention (which
read different tensors) do not.

**Correctness never rests on the probe.** The fused output is kept only for
the call it was computed for: a :class:`FusedProjection` reuses it when its
input is the identical tensor (same object, and unchanged since by its
version counter) and runs the fused GEMM itself otherwise. Tensors made
under ``torch.inference_mode()`` have no version counter, so an in-place
change of the input between two sibling calls there would go unseen; model
code does not do that (the siblings read the input back to back). After fusing, the probe is run again and the
fusion undone (with a warning) if the outputs differ or the forward fails.
The mechanism traces into a single graph under ``torch.compile``.

**Saving.** ``state_dict()`` of a fused model has the original per-layer keys
(``...q_proj.qweight`` etc.), and ``load_state_dict`` takes them;
:func:`gptqkit.checkpoint.save_checkpoint` refuses a fused model (its layer
bookkeeping is per original layer) and
:meth:`gptqkit.GPTQForCausalLM.save_quantized` unfuses and refuses around the
save by itself. :func:`unfuse_projections` restores the original layers
exactly (bit-identical tensors).
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from gptqkit._native import _C
from gptqkit.nn.quant_linear import QuantLinear
from gptqkit.packing import packed_words

__all__ = ["FusedQuantLinear", "FusedProjection", "FusionGroup", "find_fusable_groups", "fuse_projections",
           "unfuse_projections", "fused_groups"]

_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


class FusionGroup(NamedTuple):
    """Sibling layers fused into one GEMM: ``parent`` (a module name, ``""`` for the root) and the
    ``members``' attribute names on it, in output-column order."""

    parent: str
    members: Tuple[str, ...]


class _Member(NamedTuple):
    name: str
    start: int
    stop: int
    has_bias: bool


class _SharedOutput:
    """The fused layer's latest ``(input, input version, output, members still to serve)``.

    One tuple, replaced whole: a reader sees a consistent entry even when two
    threads run the model at once (the loser of a race recomputes).
    """

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None


def _version_of(x: torch.Tensor) -> int:
    if torch.compiler.is_compiling():
        return 0  # a traced graph holds no in-place update of its input between sibling calls
    if x.is_inference():  # no version counter (asking raises, and a torch exception costs ~20 us)
        return -1
    return x._version


class FusedQuantLinear(QuantLinear):
    """A :class:`QuantLinear` holding several sibling layers side by side along the output dimension.

    Registered on the siblings' parent as ``fused_<a>_<b>...``; the siblings
    themselves are :class:`FusedProjection` views of it. Its ``state_dict``
    entries are presented (and accepted by ``load_state_dict``, through a
    hook on the parent) under the original layers' names.
    """

    def __init__(self, *args, members: Sequence[_Member] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.members: Tuple[_Member, ...] = tuple(members)
        self.register_state_dict_post_hook(_present_members_state)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", members=" + "+".join(m.name for m in self.members)


class FusedProjection(nn.Module):
    """Stands in for one fused sibling: returns its columns ``[start, stop)`` of the fused output.

    The columns are a view (no copy); the first member called with a new input
    runs the fused GEMM and the others reuse its output for that same input.
    """

    def __init__(self, fused: FusedQuantLinear, shared: _SharedOutput, member: _Member):
        super().__init__()
        self.in_features = fused.in_features
        self.out_features = member.stop - member.start
        self.start, self.stop = member.start, member.stop
        # Plain attributes, not submodules: the fused layer is registered once, on the parent.
        self.__dict__["_fused"] = fused
        self.__dict__["_shared"] = shared
        self.__dict__["_count"] = len(fused.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        entry = shared.entry
        version = _version_of(x)
        if entry is not None and entry[0] is x and entry[1] == version:
            y, remaining = entry[2], entry[3] - 1
        else:
            y, remaining = self._fused(x), self._count - 1
        # Dropped once every member had its share, so no activation outlives its step.
        shared.entry = (x, version, y, remaining) if remaining > 0 else None
        return y[..., self.start:self.stop]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        pass  # this layer's tensors are read by the fused layer's load hook

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, columns "
                f"[{self.start}, {self.stop}) of {type(self._fused).__name__}")


# ---------------------------------------------------------------------------- tensors
def _zero_points(layer_qzeros: torch.Tensor, bits: int, n: int, fmt: str) -> torch.Tensor:
    """True zero points int32 ``[G, n]`` (on the CPU) of packed ``qzeros``."""
    qz = layer_qzeros.detach().to("cpu").contiguous()
    zeros = torch.empty((qz.shape[0], n), dtype=torch.int32)
    _C.unpack_qzeros(qz, int(bits), fmt, zeros)
    return zeros


def _pack_zero_points(zeros: torch.Tensor, bits: int, fmt: str, device) -> torch.Tensor:
    qzeros = torch.empty((zeros.shape[0], packed_words(zeros.shape[1], bits)), dtype=torch.int32)
    _C.pack_qzeros(zeros.contiguous(), int(bits), fmt, qzeros)
    return qzeros.to(device)


def _concatenated(parts: Sequence[Mapping[str, Optional[torch.Tensor]]], bits: int, fmt: str) -> Dict[str, object]:
    """The fused layer's tensors from the members' (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``)."""
    device = parts[0]["qweight"].device
    widths = [int(p["qweight"].shape[1]) for p in parts]
    zeros = torch.cat([_zero_points(p["qzeros"], bits, w, fmt) for p, w in zip(parts, widths)], dim=1)
    biases = [p.get("bias") for p in parts]
    bias = None
    if any(b is not None for b in biases):
        dtype = next(b for b in biases if b is not None).dtype
        bias = torch.cat([b.to(device=device, dtype=dtype) if b is not None else torch.zeros(w, dtype=dtype,
                                                                                         device=device)
                          for b, w in zip(biases, widths)])
    return {"qweight": torch.cat([p["qweight"] for p in parts], dim=1),
            "qzeros": _pack_zero_points(zeros, bits, fmt, device),
            "scales": torch.cat([p["scales"] for p in parts], dim=1),
            "g_idx": parts[0]["g_idx"].clone(), "bias": bias}


def _members_tensors(fused: FusedQuantLinear) -> List[Tuple[_Member, Dict[str, Optional[torch.Tensor]]]]:
    """Each member's own tensors, cut out of the fused layer (contiguous copies, bit-identical)."""
    zeros = _zero_points(fused.qzeros, fused.bits, fused.out_features, fused.format)  # unpacked once for all
    out = []
    for member in fused.members:
        a, b = member.start, member.stop
        bias = fused.bias[a:b].clone() if member.has_bias and fused.bias is not None else None
        out.append((member, {"qweight": fused.qweight[:, a:b].contiguous(),
                             "qzeros": _pack_zero_points(zeros[:, a:b], fused.bits, fused.format, fused.qweight.device),
                             "scales": fused.scales[:, a:b].contiguous(), "g_idx": fused.g_idx.clone(), "bias": bias}))
    return out


def _present_members_state(module: FusedQuantLinear, state_dict, prefix: str, local_metadata):
    """state_dict hook: replaces the fused layer's entries by its members' (original checkpoint keys)."""
    parent = prefix[:prefix.rstrip(".").rfind(".") + 1]  # "a.b.fused_x." -> "a.b."
    for t in _TENSORS:
        state_dict.pop(prefix + t, None)
    for member, tensors in _members_tensors(module):
        for t, value in tensors.items():
            if value is not None:
                state_dict[f"{parent}{member.name}.{t}"] = value


def _gather_fused_state(parent: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs):
    """load_state_dict pre-hook of a fused layer's parent (it sees the members' keys; the fused layer
    itself is handed only its own): builds each fused layer's entries from its members'."""
    for own, module in parent.named_children():
        if isinstance(module, FusedQuantLinear):
            _gather_members_state(module, state_dict, prefix, own, missing_keys, unexpected_keys, error_msgs)


def _gather_members_state(module: FusedQuantLinear, state_dict, parent: str, own: str, missing_keys,
                          unexpected_keys, error_msgs):
    keys = [{t: f"{parent}{m.name}.{t}" for t in _TENSORS} for m in module.members]
    if not any(k in state_dict for ks in keys for k in ks.values()):
        return  # nothing for this layer (its missing keys are reported by the usual check)
    parts = []
    for member, ks in zip(module.members, keys):
        wanted = [ks[t] for t in _TENSORS[:4]] + ([ks["bias"]] if member.has_bias else [])
        absent = [k for k in wanted if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        if not member.has_bias and ks["bias"] in state_dict:
            unexpected_keys.append(ks["bias"])
            return
        parts.append({t: state_dict[ks[t]] for t in _TENSORS if ks[t] in state_dict})
    for member, part in zip(module.members, parts):
        width = member.stop - member.start
        expected = {"qweight": (module.qweight.shape[0], width), "scales": (module.scales.shape[0], width),
                    "qzeros": (module.qzeros.shape[0], packed_words(width, module.bits)),
                    "g_idx": (module.in_features,)}
        for t, shape in expected.items():
            if tuple(part[t].shape) != shape:
                error_msgs.append(f"size mismatch for {parent}{member.name}.{t}: copying a param with shape "
                                  f"{tuple(part[t].shape)} from checkpoint, the shape in current model is {shape}.")
                return
    if any(not torch.equal(p["g_idx"].cpu(), parts[0]["g_idx"].cpu()) for p in parts[1:]):
        error_msgs.append(f"{parent}{own}: the layers fused in it have different g_idx in the state dict; call "
                          f"gptqkit.nn.unfuse_projections(model) before loading it")
        return
    for ks in keys:
        for k in ks.values():
            state_dict.pop(k, None)
    for t, value in _concatenated(parts, module.bits, module.format).items():
        if value is not None:
            state_dict[f"{parent}{own}.{t}"] = value


# ---------------------------------------------------------------------------- finding groups
def _default_probe_inputs(model: nn.Module) -> Dict[str, torch.Tensor]:
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, Mapping) and isinstance(dummy.get("input_ids"), torch.Tensor):
        ids = dummy["input_ids"][:1]  # one sequence is enough, and a forward of a big model on a CPU is not free
    else:
        ids = torch.tensor([[1, 2, 3, 4, 5]])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        ids = ids % int(vocab)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device
    return {"input_ids": ids.to(device)}


def _run_probe(model: nn.Module, inputs) -> object:
    """One forward pass in eval mode (dropout would make the before/after check compare noise),
    every module's training flag restored afterwards."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                return model(**inputs)
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            return model(inputs)
    finally:
        for m, flag in training.items():
            m.training = flag


def _probe_output(out) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _why_not_fusable(layers: Sequence[QuantLinear]) -> Optional[str]:
    first = layers[0]
    for layer in layers[1:]:
        for attr in ("bits", "group_size", "format", "in_features"):
            if getattr(layer, attr) != getattr(first, attr):
                return f"different {attr}"
        if layer.scales.dtype != first.scales.dtype:
            return "different scales dtype"
        if layer.qweight.device != first.qweight.device:
            return "on different devices"
        if (layer.bias is not None and first.bias is not None) and layer.bias.dtype != first.bias.dtype:
            return "different bias dtype"
        if not torch.equal(layer.g_idx, first.g_idx):
            return "different g_idx (act-order permutations)"
    if any(layer.qweight.device.type == "meta" for layer in layers):
        return "not loaded (meta device)"
    if any(isinstance(layer, FusedQuantLinear) for layer in layers):
        return "already fused"
    return None


def find_fusable_groups(model: nn.Module, example_inputs=None) -> List[FusionGroup]:
    """The sibling :class:`QuantLinear` layers that read the same input, found by one forward pass.

    Args:
        model: any module with :class:`QuantLinear` layers (a transformers model, typically).
        example_inputs: what to call ``model`` with for the probe: a mapping
            (keyword arguments), a tuple (positional) or a tensor. Default:
            the first row of ``model.dummy_inputs`` (transformers models: five
            token ids), or ``input_ids`` ``[[1, 2, 3, 4, 5]]``.

    Returns:
        One :class:`FusionGroup` per set of siblings (children of the same
        module) that received the identical input tensor object in every call
        of the probe and can share a GEMM, members in registration order
        (readers of one tensor that cannot all share one GEMM are split into
        sets that can).
        Layers that never ran in the probe (e.g. experts no token was routed
        to) are not grouped.
    """
    return _probe_groups(model, _default_probe_inputs(model) if example_inputs is None else example_inputs)[0]


def _probe_groups(model: nn.Module, inputs) -> Tuple[List[FusionGroup], Optional[torch.Tensor]]:
    """:func:`find_fusable_groups` and the probe's output (logits), from one forward pass."""
    names = {id(m): n for n, m in model.named_modules()}
    inputs_seen: Dict[str, List[torch.Tensor]] = {}
    handles = []

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            inputs_seen.setdefault(names[id(module)], []).append(args[0])  # keeps it alive: ids stay unique

    for module in model.modules():
        if isinstance(module, QuantLinear) and not isinstance(module, FusedQuantLinear):
            handles.append(module.register_forward_pre_hook(record))
    try:
        output = _probe_output(_run_probe(model, inputs))
    finally:
        for h in handles:
            h.remove()

    groups: List[FusionGroup] = []
    for parent_name, parent in model.named_modules():
        by_inputs: Dict[Tuple[int, ...], List[str]] = {}
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full in inputs_seen:
                by_inputs.setdefault(tuple(id(x) for x in inputs_seen[full]), []).append(child_name)
        for readers in by_inputs.values():
            compatible: List[List[str]] = []  # readers of one tensor, split into sets that can share a GEMM
            for name in readers:
                layer = getattr(parent, name)
                home = next((c for c in compatible if _why_not_fusable([getattr(parent, c[0]), layer]) is None), None)
                if home is None:
                    compatible.append([name])
                else:
                    home.append(name)
            groups += [FusionGroup(parent_name, tuple(c)) for c in compatible if len(c) > 1]
    return groups, output


# ---------------------------------------------------------------------------- fusing
def _fused_name(parent: nn.Module, members: Sequence[str]) -> str:
    name = "fused_" + "_".join(members)
    if hasattr(parent, name):
        raise ValueError(f"cannot fuse {list(members)}: the module already has an attribute {name!r}")
    return name


def _fuse_group(model: nn.Module, group: FusionGroup) -> None:
    parent = model.get_submodule(group.parent)
    layers = []
    for name in group.members:
        layer = getattr(parent, name, None)
        if not isinstance(layer, QuantLinear) or isinstance(layer, FusedQuantLinear):
            raise ValueError(f"{group}: {name!r} is not a QuantLinear of {group.parent or 'the model'!r}")
        layers.append(layer)
    why = _why_not_fusable(layers)
    if why is not None:
        raise ValueError(f"{group}: the layers cannot share one GEMM ({why})")
    first = layers[0]
    members, start = [], 0
    for name, layer in zip(group.members, layers):
        members.append(_Member(name, start, start + layer.out_features, layer.bias is not None))
        start += layer.out_features
    tensors = _concatenated([{t: getattr(layer, t) for t in _TENSORS} for layer in layers], first.bits,
                            first.format)
    fused = FusedQuantLinear(first.bits, first.group_size, first.in_features, start,
                             bias=tensors["bias"] is not None, format=first.format, device="meta",
                             dtype=first.scales.dtype, members=members)
    fused._assign(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], tensors["bias"])
    fused.train(first.training)
    fused._prepare_gpu_if_needed()
    shared = _SharedOutput()
    for member in members:
        setattr(parent, member.name, FusedProjection(fused, shared, member))
    parent.add_module(_fused_name(parent, group.members), fused)
    if not parent.__dict__.get("_gptqkit_gathers_fused_state"):
        parent.register_load_state_dict_pre_hook(_gather_fused_state)
        parent.__dict__["_gptqkit_gathers_fused_state"] = True


def _unfuse(parent: nn.Module, attr: str, fused: FusedQuantLinear) -> None:
    for member, t in _members_tensors(fused):
        layer = QuantLinear(fused.bits, fused.group_size, fused.in_features, member.stop - member.start,
                            bias=member.has_bias, format=fused.format, device="meta", dtype=fused.scales.dtype)
        layer._assign(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t["bias"])
        layer.train(fused.training)
        layer._prepare_gpu_if_needed()
        setattr(parent, member.name, layer)
    delattr(parent, attr)


def fused_groups(model: nn.Module) -> List[FusionGroup]:
    """The groups currently fused in ``model`` (empty for an unfused model)."""
    return [FusionGroup(parent_name, tuple(m.name for m in child.members))
            for parent_name, parent in model.named_modules()
            for _, child in parent.named_children() if isinstance(child, FusedQuantLinear)]


def unfuse_projections(model: nn.Module, groups: Optional[Iterable[FusionGroup]] = None) -> List[FusionGroup]:
    """Undoes :func:`fuse_projections`: every fused group (or only those in ``groups``) becomes its
    original :class:`QuantLinear` layers again, with bit-identical tensors. Returns the groups it unfused."""
    only = None if groups is None else {FusionGroup(str(g[0]), tuple(g[1])) for g in groups}
    undone = []
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, FusedQuantLinear):
                group = FusionGroup(parent_name, tuple(m.name for m in child.members))
                if only is None or group in only:
                    _unfuse(parent, attr, child)
                    undone.append(group)
    return undone


def fuse_projections(model: nn.Module, groups: Optional[Iterable[Sequence]] = None, example_inputs=None,
                     verify: bool = True, atol: float = 1e-2) -> List[FusionGroup]:
    """Fuses sibling quantized layers that read the same input into one GEMM each (module docstring).

    Args:
        model: a model with :class:`QuantLinear` layers (e.g. from
            :func:`gptqkit.checkpoint.load_checkpoint`), on its final device.
        groups: which layers to fuse, as ``(parent_name, (member, ...))``
            pairs; default: :func:`find_fusable_groups` (one probe forward).
        example_inputs: the probe's input (see :func:`find_fusable_groups`).
        verify: compare the model's probe output before and after fusing;
            if it fails or differs by more than ``atol`` (relative to the
            output's largest magnitude), undo everything and warn.
        atol: the tolerance of that check. The fused GEMM computes each
            output column as the unfused one does, but GPU kernels may split
            the sum over K differently for a wider layer.

    Returns:
        The groups fused (empty when there was nothing to fuse or the check
        undid it).

    Raises:
        ValueError: an explicit group names layers that are missing, not
            quantized or that cannot share a GEMM.
    """
    probe = _default_probe_inputs(model) if (verify or groups is None) and example_inputs is None else example_inputs
    before = None
    if groups is None:
        todo, before = _probe_groups(model, probe)  # the probe's output is the check's reference
    else:
        todo = [FusionGroup(str(g[0]), tuple(g[1])) for g in groups]
        if todo and verify:
            before = _probe_output(_run_probe(model, probe))
    if not todo:
        return []
    done: List[FusionGroup] = []
    try:
        for group in todo:
            _fuse_group(model, group)
            done.append(group)
    except Exception:
        unfuse_projections(model, done)  # groups fused before this call stay
        raise
    if verify:
        problem = None
        try:
            after = _probe_output(_run_probe(model, probe))
        except Exception as exc:  # e.g. a model that reshapes its projections' output with .view(-1)
            problem = f"the fused model's forward failed ({type(exc).__name__}: {exc})"
        else:
            if before is not None and after is not None:
                scale = max(float(before.detach().abs().max()), 1.0)
                diff = float((after.detach().float() - before.detach().float()).abs().max())
                if not diff <= atol * scale:
                    problem = (f"its output differs from the unfused model's by {diff:.3g} "
                               f"(tolerance {atol * scale:.3g})")
        if problem is not None:
            unfuse_projections(model, done)
            warnings.warn(f"fuse_projections: left the model unfused: {problem}", RuntimeWarning, stacklevel=2)
            return []
    return done
