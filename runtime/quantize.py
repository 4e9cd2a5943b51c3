"""GPTQ-quantize every decoder linear to its planned bits and group size, in one gptqmodel pass.

gptqmodel's per-module `dynamic` config carries the plan: each module is named exactly (`+:` with its
bits and group size, `-:` to keep it at 16 bits), and the saved checkpoint records it, so gptqmodel
and vLLM load each module at its own bits.
"""

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qra.files import atomic_folder
from qra.plans.memory import SettingsFor
from qra.plans.schema import ModuleSettings
from qra.plans.spec import LinearSpec, ModelSpec
from qra.runtime.data import Batch
from qra.runtime.heap import trim_heap
from qra.runtime.lora_init import Decomposition, calibration_hessians, decompose, hessian_factor, needs_init

if TYPE_CHECKING:
    from gptqmodel.models.base import BaseQModel
    from torch import nn

# gptqmodel compiles a small C++ extension on first use and sizes its CPU pool from the core count.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))


def _exact(path: str) -> str:
    return f"^{re.escape(path)}$"


def gptq_dynamic(spec: ModelSpec, settings_for: SettingsFor) -> dict[str, dict[str, int]]:
    """The per-module `dynamic` config of gptqmodel for a plan."""
    dynamic: dict[str, dict[str, int]] = {}
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            path = spec.module_path(index, module)
            if settings.bits == 16:
                dynamic[f"-:{_exact(path)}"] = {}
            else:
                dynamic[f"+:{_exact(path)}"] = {"bits": settings.bits, "group_size": settings.group_size}
    return dynamic


def gptqmodel_log_dir() -> Path:
    """Where gptqmodel's output and `logs/` folder go (see `quiet_gptqmodel`)."""
    return Path(tempfile.gettempdir()) / "qra-gptqmodel"


@functools.cache
def _process_log(path: Path) -> TextIO:
    """`path`, opened for appending once per process and left open until the process exits. Libraries imported
    while stdout and stderr point at it bind logging handlers to it for good (at import, tokenicer, which
    gptqmodel imports, calls `logging.basicConfig(level=logging.INFO)`; datasets and transformers add a
    `StreamHandler()`), so it must outlive them: their messages keep going to this file, not to the terminal."""
    return path.open("a", buffering=1)


@contextlib.contextmanager
def quiet_gptqmodel(log_dir: Path | None = None) -> Iterator[None]:
    """gptqmodel prints configs and progress bars on stdout and writes a `logs/` folder into the working
    directory; send both to `log_dir` (paths given to gptqmodel inside must be absolute). The log file stays
    open after the block, for the logging handlers that libraries imported inside it bound to it."""
    log_dir = (log_dir or gptqmodel_log_dir()).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = _process_log(log_dir / "gptqmodel.log")
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), contextlib.chdir(log_dir):
        yield


def quantize_to_plan(
    model_folder: Path,
    spec: ModelSpec,
    settings_for: SettingsFor,
    calibration: list[list[int]],
    output: Path,
    batch_size: int = 4,
) -> Path:
    """Quantize the model in `model_folder` per module as planned and save a gptqmodel checkpoint."""
    from gptqmodel import GPTQModel, QuantizeConfig

    samples = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    model_folder, output = Path(model_folder).resolve(), Path(output).resolve()
    with quiet_gptqmodel():
        config = QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True, dynamic=gptq_dynamic(spec, settings_for))
        model = GPTQModel.load(str(model_folder), config, device="cpu")
        model.quantize(samples, batch_size=batch_size)
        model.save(str(output))
    return output


def load_quantized(folder: Path, dtype: str = "bfloat16") -> "BaseQModel":
    """A gptqmodel checkpoint loaded with the TORCH backend (the one that trains on CPU and GPU)."""
    import torch
    from gptqmodel import BACKEND, GPTQModel

    folder = Path(folder).resolve()
    with quiet_gptqmodel():
        wrapper = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=getattr(torch, dtype))
    for module in wrapper.model.modules():
        _eager_dequantize(module)
    return wrapper


def _eager_dequantize(module: "nn.Module") -> None:
    # gptqmodel torch.compiles each module's dequantize; dynamo then recompiles per module and gives up
    # past its limit of 128 (SmolLM2 has 210), so keep the eager method.
    module.__dict__.pop("dequantize_weight", None)


def placeholder_quantized(model: "nn.Module", spec: ModelSpec, settings_for: SettingsFor) -> "nn.Module":
    """`model` with every module below 16 bits replaced, in place, by gptqmodel's TORCH linear at its planned
    bits and group size (as `load_quantized` builds them), holding zeros instead of a GPTQ quantization.
    For measuring memory only: the packed tensors match a real quantization's in shape and dtype."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            if settings.bits == 16:
                continue
            path = spec.module_path(index, module)
            linear = model.get_submodule(path)
            packed = TorchLinear(
                bits=settings.bits, group_size=settings.group_size, sym=True, desc_act=False,
                in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None,
                register_buffers=True,
            )
            packed.scales = packed.scales.to(linear.weight.dtype)  # as `load_quantized` holds them, in its dtype
            if linear.bias is not None:
                packed.bias = linear.bias.detach().clone()  # GPTQ keeps the bias unquantized
            with quiet_gptqmodel():
                packed.post_init()
            _eager_dequantize(packed)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, packed)
    return model


class GPTQModelWeights:
    """`qra materialize`'s weight source (a `qra.runtime.run.WeightSource`): one gptqmodel quantization pass
    over the base model at every module's planned bits, calibrated on `calibration`, saved to `folder` once
    (a staging folder renamed into place) and loaded with the TORCH backend, then moved to `device`. A plan
    with every module at 16 bits loads the base model as it is.

    For modules with a non-zero `lora_init`, the corrections are computed on the CPU before the model moves to
    `device`, from the float base, the loaded quantized weights and (for `calibrated`) the float model's input
    Hessians over `calibration_batches` (the search's calibration batches, so both see the same statistics);
    the float model and the Hessians are dropped before training starts."""

    def __init__(self, base: Path, spec: ModelSpec, calibration: list[list[int]], folder: Path, dtype: str,
                 dequantize_in_backward: bool = True, device: str = "cpu",
                 calibration_batches: "Sequence[Batch]" = ()) -> None:
        self.base, self.spec, self.calibration, self.folder = base, spec, calibration, folder
        self.dtype, self.dequantize_in_backward, self.device = dtype, dequantize_in_backward, device
        self.calibration_batches = list(calibration_batches)
        self.quantized: Path | None = None  # the gptqmodel checkpoint, once made (None: 16-bit plan)
        self._decompositions: dict[tuple[int, str], Decomposition] = {}

    def decomposition(self, layer: int, module: LinearSpec, settings: ModuleSettings) -> Decomposition:
        return self._decompositions[(layer, module.name)]

    def _decompose(self, model: "nn.Module", settings_for: SettingsFor) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        wanted = [(index, module, settings_for(index, module)) for index, layer in enumerate(self.spec.layers)
                  for module in layer if settings_for(index, module).bits < 16 and settings_for(index, module).lora_init != "zeros"]
        float_model = AutoModelForCausalLM.from_pretrained(self.base, dtype=getattr(torch, self.dtype))
        factors = {}
        if any(settings.lora_init == "calibrated" for _, _, settings in wanted):
            if not self.calibration_batches:
                raise ValueError("the calibrated init needs the calibration batches")
            hessians = calibration_hessians(float_model, self.spec, self.calibration_batches)
            factors = {key: hessian_factor(hessians.pop(key)) for key in list(hessians)}
        for index, module, settings in wanted:
            path = self.spec.module_path(index, module)
            with torch.no_grad():
                quantized = model.get_submodule(path).dequantize_weight(num_itr=1).T
            factor = factors.get((index, module.role)) if settings.lora_init == "calibrated" else None
            self._decompositions[(index, module.name)] = decompose(
                float_model.get_submodule(path).weight.detach(), quantized, settings.rank, factor)
        del float_model, factors
        trim_heap()

    @contextlib.contextmanager
    def weights(self, settings_for: SettingsFor) -> Iterator["nn.Module"]:
        import torch
        from transformers import AutoModelForCausalLM

        from qra.runtime.qlinear import enable_dequantize_in_backward

        if all(settings_for(i, module).bits == 16 for i, layer in enumerate(self.spec.layers) for module in layer):
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=getattr(torch, self.dtype))
        else:
            if not (self.folder / "config.json").is_file():
                with atomic_folder(self.folder) as staging:
                    quantize_to_plan(self.base, self.spec, settings_for, self.calibration, staging)
                trim_heap()  # the quantization pass's churn would make training's page faults costly
            self.quantized = self.folder
            model = load_quantized(self.folder, self.dtype).model
            if needs_init(self.spec, settings_for):
                self._decompose(model, settings_for)
            if self.dequantize_in_backward:
                enable_dequantize_in_backward(model)
        model.config.use_cache = False
        yield model.to(self.device)
