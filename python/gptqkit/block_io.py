"""What goes into and comes out of a decoder block while it is calibrated.

:class:`BlockInputs` holds a batch's block arguments; :class:`SlabCache`
keeps per-batch activations in one allocation; :class:`FrozenOutputs`
replays the outputs of block parts whose layers are final; :class:`Stop`
ends a forward pass once the inputs it was run for are seen. The helpers
shape activations into the rows the Hessian accumulators take. Used by
:mod:`gptqkit.model`; nothing here knows about quantization settings.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from gptqkit._gpu import gpu_backend
from gptqkit.discovery import find_linear_layers, is_conv1d
from gptqkit.moe import only_real_tokens


class Stop(Exception):
    """Ends a forward pass once the inputs it was run for have been seen."""


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or tuples/lists/dicts of them) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


class BlockInputs:
    """What one block receives for one batch, besides its hidden states."""

    def __init__(self, rest: tuple, kwargs: dict, mask: Optional[torch.Tensor]):
        self.rest = rest  # positional arguments after the hidden states
        self.kwargs = kwargs
        self.mask = mask  # [b, T] token mask of the batch (1 = real token)

    def call(self, block: nn.Module, hidden: torch.Tensor, dev) -> Any:
        with only_real_tokens(block, self.mask):  # padding reaches no MoE expert's Hessian
            return block(hidden.to(dev), *move_to(self.rest, dev), **move_to(self.kwargs, dev))


def share_equal(obj: Any, prev: Any) -> Any:
    """``obj`` with every tensor that equals the one at the same place in ``prev`` replaced by
    ``prev``'s: batches' block arguments are then stored once, not once per batch."""
    if isinstance(obj, torch.Tensor):
        if (isinstance(prev, torch.Tensor) and prev.shape == obj.shape and prev.dtype == obj.dtype
                and prev.device == obj.device and torch.equal(prev, obj)):
            return prev
        return obj
    if isinstance(obj, (tuple, list)) and isinstance(prev, (tuple, list)) and len(obj) == len(prev):
        return type(obj)(share_equal(o, p) for o, p in zip(obj, prev))
    if isinstance(obj, dict) and isinstance(prev, dict):
        return {k: share_equal(v, prev.get(k)) for k, v in obj.items()}
    return obj


def clone_outputs(obj: Any) -> Any:
    """A copy of a module output, so that in-place updates downstream cannot change a kept one."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(clone_outputs(o) for o in obj)
    if isinstance(obj, list):
        return [clone_outputs(o) for o in obj]
    return obj


class SlabCache:
    """Per-batch tensors of one kind (block inputs, a part's outputs) kept in
    one allocation of ``[n_batches, *shape]``.

    Why: a cache made of a hundred megabyte-sized tensors, allocated between
    the temporaries of the forward passes, pins the heap around them: freed
    temporaries leave holes glibc cannot return, and the peak memory of a
    run grows by hundreds of megabytes, differently on every run. One large
    allocation per cache is mapped on its own and returned whole when freed.
    Tensors of another shape (a shorter last batch) are kept as clones.
    """

    def __init__(self, n_batches: int):
        self.n_batches = n_batches
        self.slab: Optional[torch.Tensor] = None

    def put(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` to keep for batch ``index``: a view of the slab when the shape fits."""
        t = t.detach()
        if self.slab is None and 0 <= index < self.n_batches:
            self.slab = torch.empty((self.n_batches,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if (self.slab is not None and 0 <= index < self.n_batches and self.slab.shape[1:] == t.shape
                and self.slab.dtype == t.dtype and self.slab.device == t.device):
            view = self.slab[index]
            view.copy_(t)
            return view
        return t.clone()


class FrozenOutputs:
    """Replays, batch by batch, the outputs of block parts whose layers are final.

    Why: true-sequential GPTQ runs a block once per layer group, but a child of
    the block (``self_attn`` once q/k/v/o are quantized) gives the same output
    on every later pass. Its output is stored the first time it runs with all
    its layers final and replayed afterwards, so later passes (the MLP
    groups, the block's output pass) skip attention entirely. Outputs are
    stored and replayed as copies, so in-place updates downstream cannot
    corrupt them. A child called more than once per forward is never cached.
    """

    def __init__(self, block: nn.Module, n_batches: int = 0):
        self.children = {name: mod for name, mod in block.named_children() if find_linear_layers(mod)}
        self.layers = {name: {f"{name}.{sub}" for sub in find_linear_layers(mod)}
                       for name, mod in self.children.items()}
        self.store: Dict[str, Dict[int, Any]] = {}
        self.uncachable: set = set()
        self.batch = 0
        self._calls: Dict[str, int] = {}
        self.tails: Dict[str, tuple] = {}
        self.n_batches = n_batches
        self._slabs: Dict[str, SlabCache] = {}

    def _keep(self, name: str, out: Any, index: int) -> Any:
        """A copy of a part's output for batch ``index``, its main tensor in the part's slab."""
        slab = self._slabs.setdefault(name, SlabCache(self.n_batches))
        if isinstance(out, torch.Tensor):
            return slab.put(index, out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return type(out)([slab.put(index, out[0])] + [clone_outputs(o) for o in out[1:]])
        return clone_outputs(out)

    def find_tails(self, block: nn.Module, entry: "BlockInputs", hidden: torch.Tensor, dev) -> Dict[str, tuple]:
        """Finds children whose output *is* the output of one of their layers.

        Why: once such a child's last layer (its "tail", e.g. ``o_proj`` of
        attention) is quantized, the child's output on every batch is just
        ``tail(cached input of tail)``; the pass that quantized the tail
        already saw that input, so the child need not run again at all.
        Decided on one real forward by tensor identity (the child returns the
        very tensor the layer produced, as a tensor or as element 0 of a tuple
        whose other elements are ``None``), never by names.

        Returns ``{child: (tail layer name, output structure, input width / output width)}``.
        """
        outputs: Dict[str, List[Any]] = {c: [] for c in self.children}
        layer_outs: Dict[str, List[torch.Tensor]] = {}
        handles = []
        for c, mod in self.children.items():
            handles.append(mod.register_forward_hook(lambda _m, _a, out, c=c: outputs[c].append(out)))
            for sub in find_linear_layers(mod):
                full = f"{c}.{sub}"
                layer_outs[full] = []
                handles.append(mod.get_submodule(sub).register_forward_hook(
                    lambda _m, _a, out, full=full: layer_outs[full].append(out)))
        try:
            entry.call(block, hidden, dev)
        finally:
            for h in handles:
                h.remove()
        tails: Dict[str, tuple] = {}
        for c, outs in outputs.items():
            if len(outs) != 1:
                continue
            out = outs[0]
            if isinstance(out, torch.Tensor):
                main, structure = out, None
            elif (isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor)
                  and all(o is None for o in out[1:])):
                main, structure = out[0], (type(out), len(out))
            else:
                continue
            for full in sorted(self.layers[c]):
                produced = layer_outs.get(full, [])
                layer = block.get_submodule(full)
                k_in, n_out = in_out_features(layer)
                if len(produced) == 1 and produced[0] is main and k_in is not None:
                    tails[c] = (full, structure, k_in / max(n_out, 1))
                    break
        self.tails = tails
        return tails

    def seed(self, child: str, outputs: List[torch.Tensor], kept: bool = False) -> None:
        """Stores ``child``'s per-batch outputs computed from its tail layer (see
        :meth:`find_tails`); ``kept``: the tensors are already cache memory (no copy)."""
        structure = self.tails[child][1]
        store = self.store.setdefault(child, {})
        for b, out in enumerate(outputs):
            out = out if structure is None else structure[0]([out] + [None] * (structure[1] - 1))
            store[b] = out if kept else self._keep(child, out, b)

    def start_batch(self, index: int) -> None:
        self.batch = index
        self._calls = {}

    def active(self, pending: set, record: bool = True):
        """Context manager: patch every child none of whose layers is in ``pending``."""
        @contextlib.contextmanager
        def patched():
            names = [c for c in self.children
                     if c not in self.uncachable and not (self.layers[c] & pending)]
            for c in names:
                mod = self.children[c]
                store = self.store.setdefault(c, {})
                mod.forward = self._replaying(c, mod.forward, store, record)
            try:
                yield
            finally:
                for c in names:
                    del self.children[c].forward  # drop the instance attribute: back to the class's forward
        return patched()

    @contextlib.contextmanager
    def suspended(self):
        """Context manager: every child runs its own forward, nothing replayed or recorded
        (the unquantized model's pass of asymmetric calibration)."""
        patched = {c: mod.__dict__.pop("forward") for c, mod in self.children.items() if "forward" in mod.__dict__}
        try:
            yield
        finally:
            for c, forward in patched.items():
                self.children[c].forward = forward

    def _replaying(self, name: str, original, store: Dict[int, Any], record: bool):
        def forward(*args, **kwargs):
            calls = self._calls.get(name, 0) + 1
            self._calls[name] = calls
            if calls > 1:  # used twice in one forward: outputs are not per-batch
                self.uncachable.add(name)
                store.clear()
                self._slabs.pop(name, None)
                return original(*args, **kwargs)
            if self.batch in store:
                return clone_outputs(store[self.batch])
            out = original(*args, **kwargs)
            if record:
                store[self.batch] = self._keep(name, out, self.batch)
            return out
        return forward


def hessian_input(x: torch.Tensor) -> torch.Tensor:
    """Activations as the Hessian accumulator takes them: on their GPU when this
    gptqkit has a GPU backend (accumulation, and then the solver, run there),
    else copied to the CPU."""
    if x.device.type != "cpu" and gpu_backend() is not None:
        return x.contiguous()
    return x.to("cpu").contiguous()


def token_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A layer's input as ``[tokens, K]`` rows for the accumulators, padded tokens
    (``mask`` 0) dropped; see :func:`hessian_input` for the device."""
    if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device).bool()]
    elif mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        x = x[mask.reshape(-1).to(x.device).bool()]  # blocks that flatten tokens (OPT)
    x = x.detach().reshape(-1, x.shape[-1])
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return hessian_input(x)


def tail_batches(width_ratio: float, hidden: List[torch.Tensor], budget: float) -> int:
    """How many batches' tail inputs to cache.

    A tail input as wide as the hidden states (attention's o_proj) costs
    nothing extra: its replayed output would take the same memory, so every
    batch is cached. A wider one (the MLP's down_proj, ~2.7x) is cached for as
    many batches as fit in ``budget`` hidden caches; the rest recompute the
    MLP's input in the output pass, trading compute for memory.
    """
    if width_ratio <= 1.0:
        return len(hidden)
    return min(len(hidden), int(budget * len(hidden) / width_ratio))


def take_slot(hidden: List[torch.Tensor], b: int, out: torch.Tensor, cache_dev) -> None:
    """Makes a block's output on batch ``b`` the next block's input: it is copied into the
    input's cache slot when it fits (the input is no longer needed), so that two full
    activation caches never coexist."""
    if out.shape == hidden[b].shape and out.dtype == hidden[b].dtype:
        hidden[b].copy_(out)
    else:
        hidden[b] = out.to(cache_dev)


def in_out_features(layer: nn.Module) -> tuple:
    """``(in_features, out_features)`` of a Linear-like layer, ``(None, None)`` without a 2-D weight."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None, None
    if is_conv1d(layer):
        return w.shape[0], w.shape[1]  # transformers' Conv1D stores [in, out]
    return w.shape[1], w.shape[0]
