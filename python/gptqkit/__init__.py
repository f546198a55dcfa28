"""gptqkit: GPTQ quantization of large language models with a native C++ core.

Core API::

    import gptqkit
    acc = gptqkit.HessianAccumulator(K)
    acc.add_batch(x)                          # layer inputs, [..., K]
    res = gptqkit.quantize_weight(W, acc.hessian(), bits=4, group_size=128)
    layer = gptqkit.pack(res.codes, res.zeros, res.scales, res.g_idx, bits=4)
    W_hat = gptqkit.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits=4)
"""

from gptqkit._native import NotPositiveDefiniteError, _C
from gptqkit.hessian import HessianAccumulator
from gptqkit.packing import PackedLayer, dequantize, pack, packed_words, unpack
from gptqkit.solver import QuantizeResult, quantize_weight

__version__ = _C.__version__

__all__ = [
    "HessianAccumulator",
    "NotPositiveDefiniteError",
    "PackedLayer",
    "QuantizeResult",
    "dequantize",
    "pack",
    "packed_words",
    "quantize_weight",
    "unpack",
    "__version__",
]
