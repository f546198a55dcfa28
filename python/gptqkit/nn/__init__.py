"""torch modules of gptqkit (require torch).

* :class:`QuantLinear` — a GPTQ-packed replacement for ``nn.Linear`` and
  transformers' ``Conv1D``, running in the native core on the CPU.
"""

from gptqkit.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
