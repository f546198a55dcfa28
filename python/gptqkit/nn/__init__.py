"""torch modules of gptqkit (require torch).

* :class:`QuantLinear` — a GPTQ-packed replacement for ``nn.Linear`` and
  transformers' ``Conv1D``, running in the native core on the CPU and in
  gptqkit's kernels on CUDA/ROCm devices.
* :func:`fuse_projections` / :func:`unfuse_projections` — run sibling layers
  that read the same input (q/k/v, gate/up) as one GEMM
  (:mod:`gptqkit.nn.fusion`).
"""

from gptqkit.nn.fusion import (FusedProjection, FusedQuantLinear, FusionGroup, find_fusable_groups,
                               fuse_projections, fused_groups, unfuse_projections)
from gptqkit.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear", "FusedQuantLinear", "FusedProjection", "FusionGroup", "find_fusable_groups",
           "fuse_projections", "fused_groups", "unfuse_projections"]
