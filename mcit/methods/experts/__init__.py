"""Task experts on top of PEFT LoRA: one PEFT adapter per expert, mixed per sample or fused into one at inference.

Used by `hide` and `disco` (and the building blocks by anything that wants experts). The experts are ordinary PEFT
adapters, so training, `save_pretrained` and export see plain LoRA; only inference differs:

- **mixed** layers output `W x + sum_i w_i * s_i * B_i A_i x` with per-sample weights w (from the router). All
  experts' factors are stacked once per stage into `A_cat` (R x d_in) and `B_cat` (d_out x R, scaling folded in),
  so a forward pass is two matmuls and an element-wise scale of the R = sum_i r_i rank channels, not a loop over
  experts and never a rebuilt layer.
- **fused** layers add one precomputed delta for all experts: `sum_b_sum_a` = (sum_i s_i B_i)(sum_i A_i) (the
  HiDe-LLaVA reference, which introduces cross terms B_i A_j) or `sum_ba` = sum_i s_i B_i A_i (exact). The factors
  stay low rank, or become one dense matrix when that is cheaper.

Routed inference runs inside a context: PEFT's own adapter path is switched off in every expert layer (the active
adapter is set to a name no layer holds, which PEFT skips) and a forward hook adds the mixed or fused delta. Per-sample
weights reach the batch rows through `SampleRouting`, a forward pre-hook on the base model that recognises each row
by its prompt tokens (and its image, when prompts repeat), so any batching, padding or row order of the evaluator works.

Modules: `bank` (factors, routed layers), `rows` (per-sample weights to batch rows), `method` (`ExpertMethod`, the
shared method skeleton whose router is a swappable strategy, mcit.routing.router).
"""

from mcit.methods.experts.bank import FUSIONS, ExpertBank, Factors, fused_factors, stacked_factors
from mcit.methods.experts.method import ExpertMethod

__all__ = ["FUSIONS", "ExpertBank", "ExpertMethod", "Factors", "fused_factors", "stacked_factors"]
