"""gptqkit: GPTQ quantization of large language models with a native C++ core.

Core API::

    import gptqkit
    acc = gptqkit.HessianAccumulator(K)
    acc.add_batch(x)                          # layer inputs, [..., K]
    res = gptqkit.quantize_weight(W, acc.hessian(), bits=4, group_size=128)
    layer = gptqkit.pack(res.codes, res.zeros, res.scales, res.g_idx, bits=4)
    W_hat = gptqkit.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits=4)
"""

from gptqkit._gpu import gpu_backend
from gptqkit._native import NotPositiveDefiniteError, _C
from gptqkit.hessian import HessianAccumulator
from gptqkit.packing import PackedLayer, dequantize, pack, packed_words, unpack
from gptqkit.solver import QuantizeResult, quantize_weight

__version__ = _C.__version__

# The Hugging Face layer imports torch and transformers: loaded on first use so
# the core API stays light.
_LAZY = {
    "GPTQForCausalLM": "gptqkit.model",
    "QuantizeReport": "gptqkit.report",
    "LayerReport": "gptqkit.report",
    "QuantizeConfig": "gptqkit.config",
    "QuantLinear": "gptqkit.nn",
    "ModelLayout": "gptqkit.discovery",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptqkit' has no attribute {name!r}")

__all__ = [
    "GPTQForCausalLM",
    "HessianAccumulator",
    "LayerReport",
    "ModelLayout",
    "QuantLinear",
    "QuantizeConfig",
    "QuantizeReport",
    "NotPositiveDefiniteError",
    "PackedLayer",
    "QuantizeResult",
    "dequantize",
    "gpu_backend",
    "pack",
    "packed_words",
    "quantize_weight",
    "unpack",
    "__version__",
]
