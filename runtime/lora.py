"""Attach LoRA with each module's own rank and alpha, through peft's rank_pattern / alpha_pattern."""

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec


def lora_config(spec: ModelSpec, settings_for: SettingsFor, dropout: float = 0.0) -> LoraConfig:
    """A peft config whose patterns name every module by its full path, so each gets its planned rank."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            path = spec.module_path(index, module)
            # peft matches pattern keys as regexes against the end of a module name: escape the full path
            ranks[re.escape(path)] = int(settings.rank)
            alphas[re.escape(path)] = float(settings.alpha)
    first = next(iter(ranks))
    return LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=sorted({module.short_name for module in spec.layers[0]}),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, spec: ModelSpec, settings_for: SettingsFor, dropout: float = 0.0) -> PeftModel:
    return get_peft_model(model, lora_config(spec, settings_for, dropout))
