"""Models published in another quantized format, which GPTQ can start from after all.

Some models are released *only* in a low-precision format: GPT-OSS stores its
experts in MXFP4 (the precision OpenAI trained them to), DeepSeek-V3/R1 and
others their Linear weights in block-scaled FP8. transformers dequantizes
both on load when asked (``Mxfp4Config(dequantize=True)``,
``FineGrainedFP8Config(dequantize=True)``; on a machine without a suitable GPU
it does so anyway), and those dequantized values are the model: GPTQ then
quantizes from them like from any full-precision model, which is what
GPTQModel and llm-compressor do with these checkpoints too.

Other quantized checkpoints (GPTQ, AWQ, bitsandbytes, ...) are refused:
quantizing their already rounded weights once more only adds error, and the
full-precision model they came from is the right input.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["DEQUANTIZED_ON_LOAD", "describe", "dequantizing_kwargs", "load_full_precision",
           "stored_quantization_method", "upcast_dequantized"]

#: quant_method -> the transformers config class that dequantizes it while loading
DEQUANTIZED_ON_LOAD = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config"}


def _as_dict(quantization_config: Any) -> Optional[Dict[str, Any]]:
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        return dict(quantization_config)
    to_dict = getattr(quantization_config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else None


def stored_quantization_method(quantization_config: Any) -> Optional[str]:
    """The ``quant_method`` of a model config's ``quantization_config`` (dict or transformers
    object), lower-cased; ``None`` when the model is not quantized."""
    qc = _as_dict(quantization_config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    return str(getattr(method, "value", method) or "unknown").lower()


def describe(method: str) -> str:
    """One line for the user: how a model stored in ``method`` is loaded for quantization."""
    return (f"the model stores its weights in {method}; transformers dequantizes them while loading, "
            f"and GPTQ quantizes from those values")


def dequantizing_kwargs(quantization_config: Any, what: str = "model") -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a model stored with ``quantization_config``
    in full precision: ``{}`` for an unquantized model, ``{"quantization_config": <X>Config(...,
    dequantize=True)}`` (the stored settings kept) for the formats in :data:`DEQUANTIZED_ON_LOAD`.

    Raises:
        ValueError: the model is stored in another quantized format (GPTQ, AWQ, ...), which
            quantize cannot start from.
    """
    method = stored_quantization_method(quantization_config)
    if method is None:
        return {}
    if method not in DEQUANTIZED_ON_LOAD:
        raise ValueError(
            f"{what} is already quantized ({method}); quantize needs the full-precision model, or one stored "
            f"in a format transformers dequantizes on load ({', '.join(sorted(DEQUANTIZED_ON_LOAD))})")
    import transformers

    config_class = getattr(transformers, DEQUANTIZED_ON_LOAD[method])
    settings = {k: v for k, v in _as_dict(quantization_config).items() if k != "quant_method"}
    settings["dequantize"] = True
    return {"quantization_config": config_class.from_dict(settings)}


def upcast_dequantized(model: Any, dtype: Any = None) -> List[str]:
    """Casts the parameters a dequantizing load left in a lower precision than the model's up to it.

    Why: transformers 5.20 (measured; 5.24 does not) leaves MXFP4 experts it
    dequantized in bfloat16 whatever ``dtype`` was asked for, so a float32 model
    gets bfloat16 experts and its first forward fails with a dtype mismatch
    (and calibration would run the experts in bfloat16). The target is
    ``dtype``, or with ``dtype`` None ("auto") the input embeddings' dtype.
    Only narrower floating-point parameters are cast: modules a model keeps in
    float32 on purpose (``_keep_in_fp32_modules``) stay as they are. Returns the
    names of the parameters cast.
    """
    import torch

    target = dtype
    if target is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return []
        target = weight.dtype
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        return []
    width = torch.finfo(target).bits
    cast = []
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point and param.dtype != target and torch.finfo(param.dtype).bits < width:
            param.data = param.data.to(target)
            cast.append(name)
    return cast


def load_full_precision(path: Any, dtype: Any = None, *, what: str = "model", trust_remote_code: bool = False,
                        **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` in full precision.

    A model stored in one of the formats of :data:`DEQUANTIZED_ON_LOAD` is
    dequantized while loading (:func:`dequantizing_kwargs`) and the parameters
    the load left narrower are cast up (:func:`upcast_dequantized`), unless
    ``kwargs`` bring their own ``quantization_config``. ``dtype`` None keeps
    the stored dtype ("auto"); ``config`` in ``kwargs`` saves reading it.

    Raises:
        ValueError: the model is stored in another quantized format (``what`` names it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dequantizing: Dict[str, Any] = {}
    if "quantization_config" not in kwargs:
        config = kwargs.get("config")
        if config is None:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dequantizing = dequantizing_kwargs(getattr(config, "quantization_config", None), what=what)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto",
                                                 trust_remote_code=trust_remote_code, **kwargs, **dequantizing)
    if dequantizing:
        upcast_dequantized(model, dtype)
    return model
