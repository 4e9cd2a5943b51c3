"""A model's fingerprint: what a plan is bound to.

The structural fingerprint hashes the architecture and the name and shape of every tensor, so a plan
for SmolLM2-135M is refused by a Llama-3-8B (or by a model with one layer fewer) even without weights.
Where weights are local, the plan also records their content hash (see `qra.models.content_hash`).
"""

from qra.files import digest
from qra.plans.spec import ModelSpec


def structural_fingerprint(spec: ModelSpec) -> str:
    """sha256 over the architecture and every tensor's name and shape, in a canonical order."""
    tensors = {
        f"{spec.module_path(index, module)}.weight": [module.out_features, module.in_features]
        for index, layer in enumerate(spec.layers)
        for module in layer
    }
    tensors.update({tensor.name: list(tensor.shape) for tensor in spec.other_tensors})
    return digest({"architecture": spec.architecture, "tensors": tensors})
