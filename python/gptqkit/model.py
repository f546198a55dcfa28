"""``GPTQForCausalLM``: quantize any Hugging Face causal LM block by block.

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    cfg = QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True)
    model = GPTQForCausalLM.from_pretrained("path/or/hub-id", cfg)   # fp weights, on CPU
    model.quantize(examples, batch_size=1)                            # block by block
    model.save_quantized("out/")                                      # GPTQ checkpoint
    q = GPTQForCausalLM.from_quantized("out/", device="cpu")
    q.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)

How quantization runs (memory and compute):

* The model's weights stay on the CPU. Calibration batches go through the
  modules before the first block once; only the inputs of the first block are
  kept (on the quantization device, or on the CPU with
  ``cache_block_outputs=False``).
* Each block moves to the quantization device on its own. For every
  true-sequential group (q/k/v, then o, then gate/up, then down, as traced on
  the first batch) the block runs on all batches with hooks that feed the
  group's inputs into native Hessian accumulators (padded tokens dropped) and
  stop the forward as soon as the group's inputs are seen, so nothing after
  the group is computed. Layers fed the same tensor (q/k/v) share one
  accumulator. The group is quantized (GPTQ in the C++ core) and its weights
  replaced by their quantized values before the next group's inputs are
  computed. Finally the quantized block runs once more to produce the next
  block's inputs, each batch's output replacing its input in the cache.
* Nothing is recomputed that a quantized layer did not change: a block part
  whose layers are all final (attention, once o_proj is done) is never run
  again; its output on each batch is stored once and replayed. When that
  part returns its last layer's output as is (attention returns o_proj's),
  the output is computed straight from the last layer's cached input, so
  attention runs once per block in all.
* During a block, quantized layers keep their dequantized weights in the
  original dense layers (dense matmuls suit calibration batches); at the end
  of the block they become :class:`gptqkit.nn.QuantLinear`, so the in-memory
  model after ``quantize`` is exactly what ``save_quantized`` writes and
  ``from_quantized`` reads. The original weights' memory is then given back
  to the OS (see :mod:`gptqkit._memory`), so peak memory is about one block
  plus the activation caches, not the whole fp model.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from gptqkit.block_io import (BlockInputs, FrozenOutputs, SlabCache, Stop, hidden_of, hessian_input, in_out_features,
                              move_to, share_equal, tail_batches, take_slot, token_rows)
from gptqkit.calibration import model_max_length, prepare_calibration
from gptqkit.checkpoint import checkpoint_info, load_checkpoint, parse_size, save_checkpoint
from gptqkit.config import QuantizeConfig
from gptqkit.discovery import (LayerTracer, ModelLayout, _tensor_key, find_layout, find_linear_layers, get_weight,
                               set_weight, validate_groups, weights_outside_linear_layers)
from gptqkit._memory import available_bytes, exclusive_file_ranges, page_out, release_file_pages, trim_heap
from gptqkit.gptaq import FullPrecisionStream, InputShiftAccumulator, shift_operator, shifted_target
from gptqkit.hessian import HessianAccumulator
from gptqkit.moe import (defuse_experts, fused_experts, merge_expert_groups, routed_layers,
                         unsupported_reason)
from gptqkit._native import NotPositiveDefiniteError
from gptqkit.nn import QuantLinear
from gptqkit.packing import PackedLayer
from gptqkit.report import NOT_LINEAR_WARN_SHARE, LayerReport, QuantizeReport, peak_rss_mb
from gptqkit.resume import ResumeStore, calibration_fingerprint, model_fingerprint
from gptqkit.solver import quantize_weight
from gptqkit.source_formats import load_full_precision

__all__ = ["GPTQForCausalLM", "LayerReport", "QuantizeReport"]


#: layers with fewer outputs stay in full precision: scalar gates (Qwen-MoE's shared_expert_gate,
#: one output) save nothing quantized, and the GPTQ kernels of vLLM and others need whole packed words
MIN_OUT_FEATURES = 32


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt")


def _load_tokenizer(path: Union[str, os.PathLike], trust_remote_code: bool = False):
    """The tokenizer saved with a model, or ``None`` when there is none.

    Why the file check: for a local folder without tokenizer files,
    transformers 5 builds an empty tokenizer for many model types instead of
    failing, which would tokenize every text to nothing.
    """
    from transformers import AutoTokenizer

    local = os.path.isdir(os.fspath(path))
    if local and not any(os.path.exists(os.path.join(os.fspath(path), f)) for f in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return tokenizer if len(tokenizer) > 0 else None


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _result_on_cpu(result):
    """A QuantizeResult from the GPU solver with its arrays on the CPU (unchanged if already there)."""
    arrays = {f: getattr(result, f) for f in ("codes", "scales", "zeros", "g_idx", "perm")}
    if all(not isinstance(a, torch.Tensor) or a.device.type == "cpu" for a in arrays.values()):
        return result
    return replace(result, **{f: a.cpu() if isinstance(a, torch.Tensor) else a for f, a in arrays.items()})


def _from_packed(layer: nn.Module, packed: PackedLayer, group_size: int) -> QuantLinear:
    """A :class:`QuantLinear` holding stored packed tensors and ``layer``'s bias."""
    bias = getattr(layer, "bias", None)
    return QuantLinear.from_packed(packed, bias=None if bias is None else bias.detach().to("cpu"),
                                   group_size=group_size)


def _layer_error_hint(exc: Exception, layer: nn.Module, inputs_name: str = "hessian") -> str:
    """What usually causes a layer's quantization to fail, for the error message
    (``inputs_name``: how the message calls what the calibration inputs made)."""
    message = str(exc)
    if message.startswith(inputs_name) and "NaN or Inf" in message:
        w = _weight_param(layer)
        low = w is not None and w.dtype in (torch.float16, torch.bfloat16)
        return (". The layer's calibration inputs overflowed or hold NaN" +
                (f" (the model runs in {w.dtype}: load it in float32, e.g. --dtype float32)" if low else
                 " (check the earlier layers' outputs and the calibration data)"))
    if message.startswith("weight") and "NaN or Inf" in message:
        return ". The model's own weights hold NaN or Inf: the checkpoint is damaged"
    if isinstance(exc, NotPositiveDefiniteError):
        return (". Its calibration inputs are (nearly) rank-deficient: more or more varied calibration data "
                "helps, or a larger damp_percent")
    return ""


def _weight_param(layer: nn.Module) -> Optional[torch.Tensor]:
    w = getattr(layer, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def split_for_hessian_memory(block: nn.Module, groups: List[List[str]],
                             budget: Optional[int]) -> tuple:
    """``groups`` with every group whose Hessians exceed ``budget`` bytes cut into consecutive slices.

    The Hessians of a group are held together until its layers are quantized.
    Layers of one parent module with the same input width (q/k/v, an expert's
    gate/up) count once, as they share one Hessian. Slices of a group are
    quantized one after the other; the layers of one true-sequential group do
    not feed each other, so the result does not change. Returns ``(groups,
    [(layers, bytes needed, slices) per group that was cut])``; ``budget`` None
    cuts nothing.
    """
    if budget is None:
        return groups, []
    out, splits = [], []
    for group in groups:
        units: Dict[tuple, List[str]] = {}
        for name in group:
            k = in_out_features(block.get_submodule(name))[0] or 0
            units.setdefault((name.rpartition(".")[0], k), []).append(name)
        # one float32 K x K accumulator (HessianAccumulator's default) per unit
        sized = [(names, 4 * k * k) for (_, k), names in units.items()]
        need = sum(nbytes for _, nbytes in sized)
        if need <= budget:
            out.append(group)
            continue
        slices, current, used = [], [], 0
        for names, nbytes in sized:
            if current and used + nbytes > budget:
                slices.append(current)
                current, used = [], 0
            current.extend(names)
            used += nbytes
        slices.append(current)
        out.extend(slices)
        splits.append((len(group), need, len(slices)))
    return out, splits


class GPTQForCausalLM:
    """A Hugging Face causal LM together with its GPTQ quantization settings.

    ``model`` is the underlying transformers model; calling the wrapper, and
    ``generate``, forward to it, so ``q.model`` works in transformers'
    ``TextGenerationPipeline``. Other attributes are looked up on the model.
    """

    def __init__(self, model: nn.Module, quantize_config: QuantizeConfig, tokenizer: Any = None,
                 layout: Optional[ModelLayout] = None, quantized: bool = False):
        if not isinstance(quantize_config, QuantizeConfig):
            raise TypeError(f"quantize_config: expected a QuantizeConfig, got {type(quantize_config).__name__}")
        self.model = model
        self.quantize_config = quantize_config
        self.tokenizer = tokenizer
        self.layout = layout
        self.quantized = quantized
        self.report: Optional[QuantizeReport] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_id_or_path: Union[str, os.PathLike], quantize_config: QuantizeConfig,
                        layout: Optional[ModelLayout] = None, dtype: Optional[torch.dtype] = None,
                        trust_remote_code: bool = False, **model_kwargs) -> "GPTQForCausalLM":
        """Loads a full-precision model (on the CPU) to quantize.

        Args:
            model_id_or_path: a local folder or a Hugging Face hub id.
            quantize_config: the GPTQ settings.
            layout: an explicit :class:`gptqkit.discovery.ModelLayout` for
                models whose block structure discovery gets wrong.
            dtype: weights' dtype in memory (default: the checkpoint's
                ``torch_dtype``; float32 is the most accurate for calibration).
            trust_remote_code, **model_kwargs: passed to ``from_pretrained``.

        Models published in MXFP4 (GPT-OSS) or block-scaled FP8 (DeepSeek-V3) are
        dequantized while loading and quantized from those values
        (:mod:`gptqkit.source_formats`); other quantized checkpoints raise ``ValueError``.
        """
        model = load_full_precision(model_id_or_path, dtype, what=f"model {str(model_id_or_path)!r}",
                                    trust_remote_code=trust_remote_code, **model_kwargs)
        model.eval()
        tokenizer = _load_tokenizer(model_id_or_path, trust_remote_code=trust_remote_code)
        return cls(model, quantize_config, tokenizer=tokenizer, layout=layout)

    @classmethod
    def from_quantized(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                       dtype: Optional[torch.dtype] = None, fuse: bool = False) -> "GPTQForCausalLM":
        """Loads a GPTQ checkpoint (gptqkit's, AutoGPTQ's, GPTQModel's; v1 or v2).

        The model is built from its config on the meta device (no
        full-precision weights are ever materialised), its quantized layers
        replaced by :class:`gptqkit.nn.QuantLinear`, and every tensor
        validated while loading.

        ``fuse=True`` then runs sibling layers that read the same input
        (q/k/v, gate/up) as one GEMM each (:func:`gptqkit.nn.fuse_projections`:
        fewer, larger kernel calls per token, same results); saving still
        writes the original layers.
        """
        model = load_checkpoint(path, device=device, dtype=dtype)
        if fuse:
            from gptqkit.nn import fuse_projections

            fuse_projections(model)
        qcfg = QuantizeConfig.from_quantization_config(model.config.quantization_config)
        return cls(model, qcfg, tokenizer=_load_tokenizer(path), quantized=True)

    # ------------------------------------------------------------------ running
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``model.generate`` (the quantized layers run in gptqkit's kernels)."""
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only reached for attributes the wrapper lacks: defer to the model.
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ saving
    def save_quantized(self, out_dir: Union[str, os.PathLike], max_shard_size: Union[int, str] = "2GB") -> str:
        """Writes a GPTQ checkpoint (safetensors, ``quantize_config.json``,
        ``config.json`` with ``quantization_config``, tokenizer) atomically."""
        if not self.quantized:
            raise RuntimeError("save_quantized: the model is not quantized yet; call quantize(examples) first")
        from gptqkit.nn import fuse_projections, unfuse_projections

        qc = self.quantize_config.to_quantization_config()
        fused = unfuse_projections(self.model)  # checkpoints store the original layers
        try:
            return save_checkpoint(self.model, out_dir, quantize_config_dict=qc, quantization_config_dict=qc,
                                   tokenizer=self.tokenizer, max_shard_size=max_shard_size,
                                   blocks_path=self.layout.blocks_path if self.layout is not None else None)
        finally:
            if fused:
                fuse_projections(self.model, groups=fused, verify=False)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                    commit_message: str = "Upload GPTQ checkpoint (gptqkit)", max_shard_size: str = "2GB") -> str:
        """Saves the checkpoint to a temporary folder and uploads it with ``huggingface_hub``.

        Returns the URL of the commit.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_quantized(os.path.join(tmp, "checkpoint"), max_shard_size=max_shard_size)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    def info(self, path: Union[str, os.PathLike]) -> Dict[str, Any]:
        return checkpoint_info(path)

    # ------------------------------------------------------------------ quantization
    def quantize(self, examples: Any, batch_size: int = 1, *, nsamples: Optional[int] = None,
                 seqlen: Optional[int] = None, seed: int = 0, device: Union[str, torch.device, None] = None,
                 progress: bool = True, extra_cache: float = 0.0,
                 resume_dir: Union[str, os.PathLike, None] = None,
                 hessian_memory: Union[int, str, None] = None) -> QuantizeReport:
        """Quantizes the model with GPTQ, block by block, on calibration ``examples``.

        Args:
            examples: calibration data: a list of strings, a list of dicts with
                ``input_ids`` (and ``attention_mask``), a tensor of token ids
                ``[n, seqlen]``, or a path (text, JSONL, ``.npy``/``.pt``/
                ``.safetensors`` token array) — see :mod:`gptqkit.calibration`.
            batch_size: sequences per forward pass.
            nsamples, seqlen, seed: window sampling for text sources (default
                128 windows of ``QuantizeConfig.model_seqlen`` or 512 tokens).
            device: where each block runs while it is quantized (default: CPU).
            progress: show a tqdm bar over blocks with per-layer figures.
            extra_cache: memory that may be spent, in units of one hidden-state
                cache (``nsamples * seqlen * hidden_size`` values), on keeping
                the inputs of wide last layers (the MLP's ``down_proj``), so
                that their part of the block need not be recomputed for the
                next block's inputs. 0 (default) keeps peak memory lowest;
                about 2.7 (``intermediate / hidden``) caches them all, which
                removes about a fifth of the floating-point work. On a 2-core
                CPU (SmolLM2-135M) 1.5 raised peak RSS by ~300 MB and gave
                no wall-time gain beyond run-to-run noise; it may pay where
                compute, not memory traffic, bounds the run.
            resume_dir: a folder where every finished block is stored as the
                run goes (see :mod:`gptqkit.resume`). Running the same
                quantization again with the same folder restores the stored
                blocks instead of quantizing them, and gives the same
                result as an uninterrupted run. A folder written by a run
                with other settings, calibration data or model raises
                ``ValueError``. The folder is left in place at the end
                (the CLI deletes its own once the checkpoint is saved).
            hessian_memory: most memory the Hessians of one true-sequential
                group may take at once (bytes or a size such as ``"8GB"``;
                default: half of what is available on ``device`` when the run
                starts). Only Mixture-of-Experts blocks come near it: all
                experts' gate/up layers form one group, with one ``K x K``
                float32 Hessian per expert (256 experts of width 7168 need
                53 GB). A group over the cap is collected in several passes
                over the calibration data, a slice of its layers each; the
                result is the same, bit for bit, at the cost of running the
                block's MoE part once more per extra pass.

        Returns:
            A :class:`QuantizeReport` (also kept as ``self.report``); its
            ``summary()`` is printed at the end when ``progress`` is on.
        """
        if self.quantized:
            raise RuntimeError("quantize: this model is already quantized")
        if not isinstance(extra_cache, (int, float)) or isinstance(extra_cache, bool) or not extra_cache >= 0:
            raise ValueError(f"extra_cache: expected a number >= 0, got {extra_cache!r}")
        if hessian_memory is not None:
            hessian_memory = parse_size(hessian_memory, "hessian_memory")
        cfg = self.quantize_config
        cfg.validate()
        start = time.perf_counter()
        dev = torch.device(device) if device is not None else torch.device("cpu")
        cache_dev = dev if cfg.cache_block_outputs else torch.device("cpu")
        model = self.model
        config = getattr(model, "config", None)
        batches = prepare_calibration(
            examples, self.tokenizer, nsamples=nsamples, seqlen=seqlen or cfg.model_seqlen, seed=seed,
            batch_size=batch_size, max_seqlen=model_max_length(config) if config is not None else None,
            vocab_size=getattr(config, "vocab_size", None),
        )
        # MoE experts fused into 3-D tensors become one Linear layer each (gptqkit.moe)
        defuse_experts(model)
        given = self.layout.groups if self.layout is not None else None
        self.layout = find_layout(model, self.layout)
        self._given_groups = self.layout.groups if given is not None else None
        self._traced_groups: Dict[tuple, List[List[str]]] = {}
        layout = self.layout
        blocks = layout.blocks(model)
        report = QuantizeReport(tokens=int(sum(int(b["attention_mask"].sum()) for b in batches)))
        self._check_linear_coverage(blocks, report)
        store = None
        if resume_dir is not None:
            store = ResumeStore(resume_dir, {
                "quantize_config": cfg.to_dict(), "checkpoint_format": self._format(),
                "calibration": calibration_fingerprint(batches), "model": model_fingerprint(model, blocks),
            })

        use_cache = getattr(config, "use_cache", None)
        if config is not None:
            config.use_cache = False
        try:
            with torch.no_grad():
                hidden, inputs = self._capture_block_inputs(batches, blocks, dev, cache_dev)
                stream = None
                if cfg.gptaq:  # the unquantized model's activations, run beside the quantized ones
                    slab = SlabCache(len(hidden))
                    stream = FullPrecisionStream([slab.put(b, h) for b, h in enumerate(hidden)])
                # The embedding is not read again until the blocks are done: its pages need not stay resident.
                before_blocks = [model.get_submodule(name) for name in layout.pre_modules or []]
                page_out([t for mod in before_blocks for t in (*mod.parameters(), *mod.buffers())])
                trim_heap()
                if hessian_memory is None:
                    available = available_bytes(dev)
                    hessian_memory = available // 2 if available else None
                hidden = self._quantize_blocks(blocks, hidden, inputs, dev, cache_dev, report, progress,
                                               extra_cache=float(extra_cache), store=store,
                                               hessian_memory=hessian_memory, stream=stream)
                if cfg.lm_head:
                    self._quantize_lm_head(hidden, [b["attention_mask"] for b in batches], dev, report, progress,
                                           stream=stream)
                del stream
        finally:
            if config is not None and use_cache is not None:
                config.use_cache = use_cache
        gc.collect()
        self.quantized = True
        if config is not None:
            config.quantization_config = cfg.to_quantization_config()
        report.seconds = time.perf_counter() - start
        report.peak_rss_mb = peak_rss_mb()
        self.report = report
        if progress:
            print(report.summary())
        return report

    @staticmethod
    def _check_linear_coverage(blocks: nn.ModuleList, report: QuantizeReport) -> None:
        """Warns, before any work, when much of the blocks' weight is outside Linear-like layers."""
        outside = weights_outside_linear_layers(blocks[0])
        total = sum(p.numel() for p in blocks[0].parameters())
        if not outside or total == 0:
            return
        report.not_linear = [f"{name} {list(shape)}" for name, shape, _ in outside]
        report.not_linear_share = sum(n for _, _, n in outside) / total
        if report.not_linear_share >= NOT_LINEAR_WARN_SHARE:
            unsplit = [f"{name} ({type(m).__name__}): {unsupported_reason(m)}"
                       for name, m in fused_experts(blocks[0]).items()]
            warnings.warn(
                f"{report.not_linear_share:.0%} of each decoder block's weights are not in Linear layers and will "
                f"stay in full precision: {', '.join(report.not_linear[:4])}"
                f"{' ...' if len(report.not_linear) > 4 else ''}. gptqkit quantizes nn.Linear and Conv1D layers, and "
                f"splits the Mixture-of-Experts layouts transformers declares into per-expert layers"
                f"{'; not these experts: ' + '; '.join(unsplit) if unsplit else ''}.",
                UserWarning, stacklevel=3)

    def _capture_block_inputs(self, batches, blocks: nn.ModuleList, dev, cache_dev):
        """Runs the modules before the blocks and records every block's arguments.

        Blocks of one kind get identical keyword arguments (masks, rotary
        embeddings, positions), but models that mix attention kinds (e.g.
        sliding-window and global layers) pass each kind its own mask. So the
        forward records the arguments of the first block of each distinct kind
        (``config.layer_types``, else the blocks' ``attention_type``) and
        stops after the last of those; the
        hidden-state input comes from block 0.

        Returns ``(hidden states entering block 0 per batch, per-block list of
        per-batch BlockInputs)``.
        """
        layer_types = getattr(getattr(self.model, "config", None), "layer_types", None)
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != len(blocks):
            layer_types = [getattr(blk, "attention_type", None) for blk in blocks]
        kinds: Dict[Any, int] = {}
        for i, kind in enumerate(layer_types):
            kinds.setdefault(kind, i)
        first_of_kind = sorted(kinds.values())
        owner = {i: kinds[kind] for i, kind in enumerate(layer_types)}
        last = first_of_kind[-1]

        model = self.model
        records: Dict[int, tuple] = {}
        handles = []

        def recorder(index):
            def hook(_mod, args, kwargs):
                records[index] = (args, kwargs)
                if index == last:
                    raise Stop
            return hook

        for i in first_of_kind:
            handles.append(blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True))
        # Only the modules before (and, for mixed kinds, the first few blocks) run.
        moved = self._modules_to(dev, self.layout.pre_modules)
        if last > 0:
            for i in range(last):
                blocks[i].to(dev)
        per_block: List[List[BlockInputs]] = [[] for _ in range(len(blocks))]
        hidden: List[torch.Tensor] = []
        hidden_slab = SlabCache(len(batches))
        try:
            for batch in batches:
                records.clear()
                try:
                    model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                          use_cache=False)
                except Stop:
                    pass
                else:
                    raise RuntimeError("the model's forward never reached its decoder blocks")
                args, kwargs = records[0]
                hidden.append(hidden_slab.put(len(hidden), (args[0] if args else kwargs["hidden_states"]).to(cache_dev)))
                for i in range(len(blocks)):
                    args, kwargs = records[owner[i]]
                    kw = {k: v for k, v in kwargs.items()
                          if k not in ("hidden_states", "past_key_value", "past_key_values")}
                    if "use_cache" in kw:
                        kw["use_cache"] = False
                    rest, kw = move_to(tuple(args[1:]), cache_dev), move_to(kw, cache_dev)
                    if per_block[i]:  # rotary tables, positions, masks: usually equal in every batch
                        prev = per_block[i][-1]
                        rest, kw = share_equal(rest, prev.rest), share_equal(kw, prev.kwargs)
                    per_block[i].append(BlockInputs(rest, kw, batch["attention_mask"]))
        finally:
            for h in handles:
                h.remove()
            self._modules_to(torch.device("cpu"), moved)
            for i in range(last):
                blocks[i].to("cpu")
        return hidden, per_block

    def _modules_to(self, dev: torch.device, names: Optional[Sequence[str]]) -> List[str]:
        names = list(names or [])
        for name in names:
            self.model.get_submodule(name).to(dev)
        return names

    def _groups_for(self, block: nn.Module, first: BlockInputs, hidden: torch.Tensor, dev) -> List[List[str]]:
        cfg = self.quantize_config
        if cfg.modules_in_block_to_quantize:
            return validate_groups(block, cfg.modules_in_block_to_quantize, "modules_in_block_to_quantize")
        if self._given_groups is not None:
            return validate_groups(block, self._given_groups, "groups")
        # Blocks differ in some models (DeepSeek's first dense blocks before the MoE ones,
        # Qwen-MoE's mlp_only_layers): groups are traced once per kind of block.
        kind = tuple((name, tuple(m.weight.shape)) for name, m in find_linear_layers(block).items())
        groups = self._traced_groups.get(kind)
        if groups is None:
            with LayerTracer(block) as tracer:
                first.call(block, hidden, dev)
            groups = self._traced_groups[kind] = merge_expert_groups(block, tracer.groups(), tracer.not_executed)
            if self.layout.groups is None:
                self.layout.groups = groups  # the first block's, for inspection
        return groups

    def _quantize_blocks(self, blocks: nn.ModuleList, hidden: List[torch.Tensor], inputs: List[List[BlockInputs]],
                         dev, cache_dev, report: QuantizeReport, progress: bool,
                         extra_cache: float = 0.0, store: Optional[ResumeStore] = None,
                         hessian_memory: Optional[int] = None,
                         stream: Optional[FullPrecisionStream] = None) -> List[torch.Tensor]:
        from tqdm.auto import tqdm

        cfg = self.quantize_config
        prefix = self.layout.blocks_path
        restored = min(store.finished_blocks(), len(blocks)) if store is not None else 0
        if restored and progress:
            print(f"resuming: restoring {restored} of {len(blocks)} finished blocks from {store.path}")
        bar = tqdm(total=len(blocks), desc="quantizing blocks", unit="block", disable=not progress)
        told_split = False
        for bi, block in enumerate(blocks):
            if bi < restored:
                self._restore_block(block, bi, store, hidden, inputs[bi], dev, cache_dev, report, stream)
                inputs[bi] = []
                bar.update(1)
                continue
            layers_before, skipped_before = len(report.layers), len(report.skipped)
            block.to(dev)
            batch_inputs = inputs[bi]
            groups = self._groups_for(block, batch_inputs[0], hidden[0], dev)
            if not cfg.true_sequential:
                groups = [[name for g in groups for name in g]]
            groups, splits = split_for_hessian_memory(block, groups, hessian_memory)
            if splits and progress and not told_split:
                told_split = True
                layers, need, passes = max(splits, key=lambda t: t[1])
                bar.write(f"Hessians of a group of {layers} layers need {need / 1e9:.2f} GB, over the "
                          f"hessian_memory cap of {hessian_memory / 1e9:.2f} GB: collecting them in {passes} "
                          f"passes over the calibration data (same result, more time)")
            report.extra_passes += sum(passes - 1 for _, _, passes in splits)
            frozen = FrozenOutputs(block, n_batches=len(batch_inputs))
            tails = frozen.find_tails(block, batch_inputs[0], hidden[0], dev)
            if stream is not None:  # the unquantized block's parts never change: each runs once per batch
                stream.replay = FrozenOutputs(block, n_batches=len(batch_inputs))
            finished = []
            for gi, group in enumerate(groups):
                pending = {name for g in groups[gi:] for name in g}
                later = {name for g in groups[gi + 1:] for name in g}
                todo = []
                for name in group:
                    full = f"{prefix}.{bi}.{name}"
                    settings = cfg.resolve(full)
                    if settings is None or in_out_features(block.get_submodule(name))[1] < MIN_OUT_FEATURES:
                        report.skipped.append(full)
                    else:
                        todo.append((name, full, settings))
                if not todo:
                    continue
                # Children whose last layer is in this group and that are final after it:
                # keep their tail's input, and never run them again (see find_tails).
                capture = {tail: child for child, (tail, _, _) in tails.items()
                           if tail in group and not (frozen.layers[child] & later) and child not in frozen.uncachable}
                limits = {tail: tail_batches(tails[child][2], hidden, budget=extra_cache)
                          for tail, child in capture.items()}
                with frozen.active(pending):
                    hessians, captured, tokens, crosses = self._collect_hessians(
                        block, [n for n, _, _ in todo], batch_inputs, hidden, dev, frozen, capture=limits,
                        prefix=f"{prefix}.{bi}.", stream=stream, advance_stream=gi == len(groups) - 1,
                        later=frozenset(later))
                trim_heap()
                operators: Dict[tuple, torch.Tensor] = {}  # layers sharing an input share M
                for name, full, settings in todo:
                    hessian, cross, operator = hessians.pop(name), crosses.pop(name, None), None
                    if cross is not None and hessian is not None:
                        key = (id(cross), settings.damp_percent)
                        if key not in operators:
                            operators[key] = self._shift_operator(cross, hessian, settings, full, block, name)
                        operator = operators[key]
                    if stream is not None:
                        stream.keep_original(block, name)
                    result = self._quantize_layer(block, name, full, hessian, settings, dev, report, bar,
                                                  tokens=tokens[name], operator=operator)
                    finished.append((name, result))
                del operators, crosses
                for tail, child in capture.items():
                    self._seed_from_tail(frozen, child, block.get_submodule(tail), captured.pop(tail), dev)
            # The quantized block produces the next block's inputs.
            with frozen.active(set(), record=False):
                for b, entry in enumerate(batch_inputs):
                    frozen.start_batch(b)
                    take_slot(hidden, b, hidden_of(entry.call(block, hidden[b], dev)), cache_dev)
            del frozen
            if stream is not None:
                if not stream.advanced:  # the unquantized model's next inputs
                    self._advance_full_precision(block, batch_inputs, stream, dev, cache_dev)
                # before the swap below: the kept layers would hold their file pages
                stream.end_block()
            # Calibration ran on the dequantized weights in plain layers (dense matmuls are
            # what a 512-token batch wants); only now do they become packed QuantLinear.
            names, results = [name for name, _ in finished], dict(finished)
            del finished
            self._swap_in_quant_layers(block, names, lambda name: self._from_result(
                block.get_submodule(name), results.pop(name)), dev)
            if store is not None:
                store.save_block(bi, {name: block.get_submodule(name) for name in names},
                                 [asdict(r) for r in report.layers[layers_before:]], report.skipped[skipped_before:])
            inputs[bi] = []
            bar.update(1)
        bar.close()
        return hidden

    def _restore_block(self, block: nn.Module, bi: int, store: ResumeStore, hidden: List[torch.Tensor],
                       batch_inputs: List[BlockInputs], dev, cache_dev, report: QuantizeReport,
                       stream: Optional[FullPrecisionStream] = None) -> None:
        """Puts a stored block back (see :mod:`gptqkit.resume`) and computes the next block's inputs.

        The block runs with the stored codes dequantized into its plain layers,
        exactly the weights the original run computed these outputs with
        (and, with ``gptaq``, first with its original weights, for the
        unquantized model's next inputs).
        """
        packed, reports, skipped = store.load_block(bi)
        linears = find_linear_layers(block)
        unknown = sorted(set(packed) - set(linears))
        if unknown:
            raise ValueError(f"resume_dir: {store.block_path(bi)} holds layers {unknown} that block {bi} does not have")
        block.to(dev)
        if stream is not None:
            self._advance_full_precision(block, batch_inputs, stream, dev, cache_dev)
        for name, (layer_packed, _) in packed.items():
            layer = block.get_submodule(name)
            set_weight(layer, torch.as_tensor(layer_packed.dequantize()).to(_weight_param(layer).dtype))
        for b, entry in enumerate(batch_inputs):
            take_slot(hidden, b, hidden_of(entry.call(block, hidden[b], dev)), cache_dev)
        self._swap_in_quant_layers(block, list(packed), lambda name: _from_packed(
            block.get_submodule(name), *packed[name]), dev)
        report.layers.extend(LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in reports)
        report.skipped.extend(skipped)

    @staticmethod
    def _advance_full_precision(block: nn.Module, batch_inputs: List[BlockInputs], stream: FullPrecisionStream,
                                dev, cache_dev) -> None:
        """Runs the block with its original weights on the unquantized model's inputs: the
        unquantized model's inputs of the next block (asymmetric calibration, :mod:`gptqkit.gptaq`)."""
        replay = stream.replay.active(set(), record=False) if stream.replay is not None else contextlib.nullcontext()
        with replay, stream.original_weights():
            for b, entry in enumerate(batch_inputs):
                if stream.replay is not None:
                    stream.replay.start_batch(b)
                take_slot(stream.hidden, b, hidden_of(entry.call(block, stream.hidden[b], dev)), cache_dev)

    @staticmethod
    def _shift_operator(cross: torch.Tensor, hessian, settings, full: str, block: nn.Module, name: str):
        """``M = D (H + λI)⁻¹`` of one layer input (see :func:`gptqkit.gptaq.shift_operator`)."""
        try:
            return shift_operator(cross, hessian, settings.damp_percent)
        except (ValueError, NotPositiveDefiniteError) as exc:
            raise type(exc)(f"{full}: {exc}{_layer_error_hint(exc, block.get_submodule(name))}") from exc

    @staticmethod
    def _seed_from_tail(frozen: FrozenOutputs, child: str, layer: nn.Module, inputs_of_tail: List[torch.Tensor],
                        dev) -> None:
        """Stores ``child``'s output on every batch, computed as ``layer(cached input)`` (see
        :meth:`FrozenOutputs.find_tails`); inputs cover the first batches only.

        A method of its own so that no loop variable outlives it: a leftover
        view of the cache slab would keep the whole slab alive into the next
        block (one hidden-state cache of extra peak memory).
        """
        outs, in_place = [], True
        for b in range(len(inputs_of_tail)):  # each input dropped as soon as it is used
            x, inputs_of_tail[b] = inputs_of_tail[b], None
            y = layer(x.to(dev))
            if y.shape == x.shape and y.dtype == x.dtype and y.device == x.device:
                x.copy_(y)  # o_proj: the output takes its input's cache slot
                y = x
            else:
                in_place = False
            outs.append(y)
        frozen.seed(child, outs, kept=in_place)

    def _quantize_layer(self, parent: nn.Module, name: str, full: str, hessian, settings, dev,
                        report: QuantizeReport, bar, tokens: Optional[int] = None,
                        operator: Optional[torch.Tensor] = None):
        """GPTQ on one layer; its weight gets the quantized values (it stays a plain layer
        until :meth:`_to_quant_linear`). Returns the :class:`QuantizeResult`.

        ``operator``: asymmetric calibration's ``M`` (:mod:`gptqkit.gptaq`); GPTQ then
        quantizes the shifted target ``W + gptaq_alpha W M``.

        ``hessian`` ``None``: an MoE expert no calibration token was routed to
        (:mod:`gptqkit.moe`); it is rounded to nearest,
        i.e. GPTQ with an identity Hessian (the clipping search then weighs
        every input column alike)."""
        cfg = self.quantize_config
        layer = parent.get_submodule(name)
        t0 = time.perf_counter()
        fallback = hessian is None
        if fallback:
            hessian = hessian_input(torch.eye(in_out_features(layer)[0], dtype=torch.float32, device=dev))
        # The solver runs where the Hessian was accumulated (see hessian_input).
        weight = get_weight(layer, torch.float32).detach().to(hessian.device).contiguous()
        target, shift = weight, None
        if operator is not None:
            target = shifted_target(weight, operator, cfg.gptaq_alpha)
            shift = float((target - weight).norm() / weight.norm().clamp_min(torch.finfo(torch.float32).tiny))
        fmt = self._format()
        try:
            result = quantize_weight(
                target, hessian, **settings.as_kwargs(),
                clip_steps=cfg.clip_steps, clip_min_ratio=cfg.clip_min_ratio,
                fp16_scales=True, min_zero_point=1 if (fmt == "v1" and not settings.sym) else 0,
            )
        except (ValueError, NotPositiveDefiniteError) as exc:
            raise type(exc)(f"{full}: {exc}{_layer_error_hint(exc, layer)}") from exc
        del target
        set_weight(layer, result.dequantize().to(weight.dtype))
        seconds = time.perf_counter() - t0
        report.layers.append(LayerReport(
            name=full, shape=tuple(weight.shape), bits=settings.bits, group_size=settings.group_size,
            loss=result.loss, damp=result.damp_used, damp_attempts=result.damp_attempts, seconds=seconds,
            tokens=tokens, rtn_fallback=fallback, target_shift=shift))
        bar.set_postfix_str(f"{name}: loss {result.loss:.3g}, damp {result.damp_used:.3g}, {seconds * 1000:.0f} ms")
        return result

    def _format(self) -> str:
        return "v2" if self.quantize_config.checkpoint_format == "gptq_v2" else "v1"

    def _from_result(self, layer: nn.Module, result) -> QuantLinear:
        """The :class:`QuantLinear` for a quantized layer (packed on the CPU; moved by :meth:`_install`)."""
        return QuantLinear.from_linear(layer, _result_on_cpu(result), format=self._format())

    def _to_quant_linear(self, parent: nn.Module, name: str, result, dev) -> None:
        """Replaces a quantized layer by a :class:`QuantLinear` holding its packed weights."""
        self._install(parent, name, self._from_result(parent.get_submodule(name), result), dev)

    def _swap_in_quant_layers(self, block: nn.Module, names: List[str], make: Callable[[str], QuantLinear],
                              dev) -> None:
        """Replaces the block's named plain layers by ``make(name)``, one at a time, moves the
        block back to the CPU and gives the replaced weights' file pages back to the OS."""
        old_weights = [_weight_param(block.get_submodule(name)) for name in names]
        noted = exclusive_file_ranges(old_weights)
        del old_weights
        for name in names:
            self._install(block, name, make(name), dev)
        block.to("cpu")
        release_file_pages(noted)
        trim_heap()

    @staticmethod
    def _install(parent: nn.Module, name: str, qlayer: QuantLinear, dev) -> None:
        dtype = _weight_param(parent.get_submodule(name)).dtype
        if dtype in (torch.float16, torch.bfloat16, torch.float32):
            qlayer = qlayer.to(dtype)
        _set_module(parent, name, qlayer.to(dev))

    def _quantize_lm_head(self, hidden: List[torch.Tensor], masks: List[torch.Tensor], dev,
                          report: QuantizeReport, progress: bool,
                          stream: Optional[FullPrecisionStream] = None) -> None:
        """Quantizes the output projection on the final hidden states (``lm_head=True``);
        with ``stream``, against the unquantized model's (asymmetric calibration)."""
        from tqdm.auto import tqdm

        model, layout = self.model, self.layout
        name = layout.lm_head_name
        if name is None:
            raise ValueError("lm_head=True, but the model's output projection (get_output_embeddings) is not "
                             "an nn.Linear/Conv1D layer")
        settings = self.quantize_config.resolve(name)
        if settings is None:
            report.skipped.append(name)
            return
        between = [model.get_submodule(n) for n in (layout.post_modules or []) if n != name]
        head = model.get_submodule(name)
        for m in between + [head]:
            m.to(dev)
        def head_input(h, mask):
            x = h.to(dev)
            for m in between:
                x = hidden_of(m(x))
            if tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]
            return x.reshape(-1, x.shape[-1]).float().to("cpu").contiguous()

        acc, cross, operator = None, None, None
        try:
            for b, (h, mask) in enumerate(zip(hidden, masks)):
                x = head_input(h, mask)
                acc = acc or HessianAccumulator(x.shape[-1])
                acc.add_batch(x)
                if stream is not None:
                    cross = cross or InputShiftAccumulator(x.shape[-1])
                    cross.add_batch(head_input(stream.hidden[b], mask), x)
            hessian = acc.hessian()
            if cross is not None:
                operator = self._shift_operator(cross.cross(), hessian, settings, name, model, name)
            bar = tqdm(total=1, desc="quantizing lm_head", disable=not progress)
            result = self._quantize_layer(model, name, name, hessian, settings, dev, report, bar,
                                          tokens=acc.n_samples, operator=operator)
            self._to_quant_linear(model, name, result, dev)
            bar.update(1)
            bar.close()
        finally:
            for m in between + [model.get_submodule(name)]:
                m.to("cpu")
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the head no longer shares the embedding's weight

    def _collect_hessians(self, block: nn.Module, names: List[str], batch_inputs: List[BlockInputs],
                          hidden: List[torch.Tensor], dev, frozen: Optional[FrozenOutputs] = None,
                          capture: Optional[Dict[str, int]] = None, prefix: str = "",
                          stream: Optional[FullPrecisionStream] = None, advance_stream: bool = False,
                          later: frozenset = frozenset()) -> tuple:
        """Accumulates the Hessian of each named layer over all batches.

        ``prefix`` (the block's dotted path and a dot) makes error messages
        name layers in full.

        Pre-hooks feed the layers' inputs (padded tokens dropped) to native
        accumulators; once every layer of the group has seen its input the
        forward stops, so nothing after the group runs. Layers fed the very
        same input tensor (q/k/v, gate/up) share one accumulator: their
        Hessians are identical, so it is computed once. ``capture`` maps
        layers to a number of batches: the full inputs of those layers on
        the first that many batches are also kept.

        MoE experts (:mod:`gptqkit.moe`) see only the tokens routed to them:
        a layer's sharing is decided on the first batch that reaches it, and
        an expert layer no token reached gets ``None`` for a Hessian
        (rounded to nearest by :meth:`_quantize_layer`).

        With ``stream`` (asymmetric calibration, :mod:`gptqkit.gptaq`), each
        batch first runs through the block with its original weights on the
        unquantized model's inputs, stopping once the layers' unquantized
        inputs are seen, and ``D = 2/n Σ (x - xq) xqᵀ`` is accumulated beside
        every Hessian. Not for routed MoE experts: the two models route
        tokens differently, so their rows do not pair up. Parts of the
        unquantized block that ran whole are replayed (``stream.replay``);
        with ``advance_stream`` (the block's last group) that pass runs the
        whole block instead of stopping, and its output becomes the
        unquantized model's next block input. ``later``: the layers of the
        block's later groups (a child holding none of them may run to its end
        in the unquantized pass, to be replayed afterwards).

        Returns ``({name: hessian or None}, {captured name: [input per batch]},
        {name: tokens its Hessian saw}, {name: D})``.
        """
        accs: Dict[str, HessianAccumulator] = {}
        owner_of: Dict[str, str] = {}  # layer -> layer whose accumulator it shares (first batch reaching it decides)
        decided: set = set()
        routed = routed_layers(block)  # padding is kept from experts by their routing (only_real_tokens)
        seen: set = set()
        state: Dict[str, Any] = {"mask": None, "batch": 0, "inputs": {}, "keep": [], "fp_phase": False,
                                 "fp_rows": {}, "fp_seen": set(), "fp_wanted": set(), "stop_after": None}
        shifted = {n for n in names if n not in routed} if stream is not None else set()
        cross_accs: Dict[str, InputShiftAccumulator] = {}
        capture = capture or {}
        captured: Dict[str, List[torch.Tensor]] = {n: [] for n in capture}
        capture_slabs = {n: SlabCache(k) for n, k in capture.items()}

        def full_precision_hook(name: str, x: torch.Tensor):
            if name not in shifted:
                return
            key = _tensor_key(x)
            if key not in state["inputs"]:  # the first layer to see an input keeps its rows
                state["inputs"][key] = name
                state["keep"].append(x)
                state["fp_rows"][name] = token_rows(x, state["mask"])
            state["fp_seen"].add(name)
            if state["fp_seen"] >= state["fp_wanted"] and not advance_stream:
                child = name.split(".", 1)[0] if "." in name else None
                replay = stream.replay
                if (replay is not None and child in replay.children and child not in replay.uncachable
                        and not (replay.layers[child] & later) and state["batch"] not in replay.store.get(child, {})):
                    # None of the child's layers is in a later group: let it finish so the replay
                    # records its output, and the next group's unquantized pass skips it
                    # (attention after o_proj's group) instead of running it again.
                    state["stop_after"] = child
                    return
                raise Stop

        def make_hook(name: str):
            def hook(_mod, args):
                x = args[0]
                if state["fp_phase"]:
                    return full_precision_hook(name, x)
                if name in captured and state["batch"] < capture[name]:
                    captured[name].append(capture_slabs[name].put(state["batch"], x))
                key = _tensor_key(x)
                owner = state["inputs"].get(key)
                if name not in decided:
                    decided.add(name)
                    if owner is not None:
                        owner_of[name] = owner
                elif owner_of.get(name) != owner:
                    raise RuntimeError(f"layer {name} shared its input with {owner_of.get(name) or 'no layer'} "
                                       f"on an earlier batch but with {owner or 'no layer'} on batch "
                                       f"{state['batch']}; the block's structure changes between batches")
                if owner is None:
                    state["inputs"][key] = name
                    state["keep"].append(x)  # held until the batch ends, so its memory is not reused
                    x = token_rows(x, None if name in routed else state["mask"])
                    if name not in accs:
                        accs[name] = HessianAccumulator(x.shape[-1])
                    try:
                        accs[name].add_batch(x)
                        if name in shifted:
                            full = state["fp_rows"].pop(name, None)
                            if full is None or full.shape != x.shape:
                                raise RuntimeError(
                                    f"{prefix}{name}: on calibration batch {state['batch']} its input in the "
                                    f"unquantized block ({'none' if full is None else list(full.shape)}) does "
                                    f"not match the quantized block's ({list(x.shape)}); asymmetric calibration "
                                    f"(gptaq) needs both to see the same tokens")
                            cross_accs.setdefault(name, InputShiftAccumulator(x.shape[-1])).add_batch(full, x)
                    except ValueError as exc:
                        layer = block.get_submodule(name)
                        raise ValueError(f"{prefix}{name}: its input on calibration batch {state['batch']}: "
                                         f"{exc}{_layer_error_hint(exc, layer, 'x')}") from exc
                seen.add(name)
                # After the first batch, the layers sharing an input are known: once every
                # distinct input is in, stop before those layers even run (q/k, gate).
                if (len(seen) == len(names) if state["batch"] == 0 else seen >= owners):
                    raise Stop
            return hook

        handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
        if shifted and stream.replay is not None:
            def stop_after_hook(child: str):
                def hook(_mod, _args, _out):
                    if state["fp_phase"] and state["stop_after"] == child:
                        raise Stop
                return hook

            def stop_before_hook(child: str):
                def hook(_mod, _args):  # a block that ran the child without its hooks: stop before the next
                    if state["fp_phase"] and state["stop_after"] not in (None, child):
                        raise Stop
                return hook
            for c, mod in stream.replay.children.items():
                handles += [mod.register_forward_hook(stop_after_hook(c)),
                            mod.register_forward_pre_hook(stop_before_hook(c))]
        owners: set = set()
        try:
            for b, (entry, h) in enumerate(zip(batch_inputs, hidden)):
                if b == 1:
                    owners = {n for n in names if n not in owner_of} | set(capture)
                seen.clear()
                mask = entry.mask
                if mask is not None and bool(mask.all()):
                    mask = None  # nothing padded: skip the per-layer copy that masking makes
                state.update(mask=mask, batch=b, inputs={}, keep=[])
                if shifted:
                    wanted = shifted if b == 0 else shifted - set(owner_of)
                    state.update(fp_phase=True, fp_rows={}, fp_seen=set(), fp_wanted=wanted, stop_after=None)
                    replay = stream.replay
                    try:
                        with (frozen.suspended() if frozen is not None else contextlib.nullcontext()), \
                                (replay.active(set(), record=not advance_stream) if replay is not None
                                 else contextlib.nullcontext()), \
                                stream.original_weights():
                            if replay is not None:
                                replay.start_batch(b)
                            out = entry.call(block, stream.hidden[b], dev)
                        if advance_stream:
                            take_slot(stream.hidden, b, hidden_of(out), stream.hidden[b].device)
                        del out
                    except Stop:
                        pass
                    state.update(fp_phase=False, inputs={}, keep=[])
                if frozen is not None:
                    frozen.start_batch(b)
                try:
                    entry.call(block, h, dev)
                except Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            state.update(keep=[], fp_rows={})
        missing = [n for n in names if n not in accs and n not in owner_of and n not in routed]
        if missing:
            raise RuntimeError(f"layers {missing} received no input during the block's forward; "
                               f"fix the groups with modules_in_block_to_quantize or a ModelLayout")
        tokens, hessians = {}, {}
        for n in list(accs):  # each accumulator freed as soon as its Hessian is out: one copy at a time
            acc = accs.pop(n)
            tokens[n], hessians[n] = acc.n_samples, acc.hessian()
            del acc
        if shifted and advance_stream:
            stream.advanced = True
        crosses = {n: acc.cross() for n, acc in cross_accs.items()}
        del cross_accs
        for n, owner in owner_of.items():
            hessians[n], tokens[n] = hessians[owner], tokens[owner]
            if owner in crosses:
                crosses[n] = crosses[owner]
        for n in names:
            if n not in hessians:  # an expert no calibration token was routed to
                hessians[n], tokens[n] = None, 0
        return hessians, captured, tokens, crosses
