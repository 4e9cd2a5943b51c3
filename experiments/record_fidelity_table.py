"""Record a fidelity table: every configuration of a small space scored once, for `bench_search.py --table`.

    python experiments/record_fidelity_table.py -o experiments/data/fidelity_table.json   # ~10-20 min on 2 cores

The model is a tiny Llama (`qra.testing`: 3 layers, hidden 128) first trained in full on the Python
reference for `--pretrain-steps`, so that quantizing it hurts the way it hurts a real model (a random
model's loss barely depends on its weights). Every configuration of bits {2,3,4,8} x ranks {4,16} per
layer (8^3 = 512) is then scored by the search's own evaluator at the top fidelity of a small ladder:
GPTQ weights from the quantization cache, LoRA at each rank, a short fine-tune, held-out loss.
Scores are written as they come (the file is rewritten atomically every 16), and a rerun resumes.
"""

import argparse
import itertools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from qra.compiler.fidelity import FidelityEvaluator, FidelityLadder, prepare_data  # noqa: E402
from qra.compiler.qcache import QuantCache  # noqa: E402
from qra.compiler.space import Gene, build_space, config_key  # noqa: E402
from qra.files import write_text  # noqa: E402
from qra.plans.schema import Device, Training  # noqa: E402
from qra.plans.spec import spec_from_config  # noqa: E402
from qra.runtime.data import Batch, load_dataset  # noqa: E402
from qra.testing import tiny_config, tiny_tokenizer  # noqa: E402

log = logging.getLogger("record_fidelity_table")
BITS, RANKS, LAYERS = (2, 3, 4, 8), (4, 16), 3


def pretrained_tiny(train_batches: Sequence[Batch], steps: int) -> torch.nn.Module:
    """A tiny Llama trained in full on the data, so that its weights matter."""
    torch.manual_seed(0)
    config = tiny_config("llama", layers=LAYERS)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def _save(path: Path, scores: dict[str, float], meta: dict) -> None:
    write_text(path, json.dumps({**meta, "scores": scores}, indent=0, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--fine-tune-steps", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    training = Training(seq_len=64, batch_size=8, steps=args.fine_tune_steps, learning_rate=5e-3, seed=0)
    data = prepare_data(load_dataset("python-reference"), tiny_tokenizer(), training.seq_len, training.batch_size)
    data = replace(data, held_out=data.held_out_prefix(32))
    model = pretrained_tiny(data.train, args.pretrain_steps)
    spec = spec_from_config(model.config)
    space = build_space(spec, BITS, RANKS, training, Device(kind="cpu", context_bytes=0))
    cache = QuantCache(model, spec, data.train[:4], group_size=128)
    ladder = FidelityLadder(steps=(0, args.fine_tune_steps), plan_steps=args.fine_tune_steps)
    evaluator = FidelityEvaluator(model, space, data, cache, ladder)
    meta = {"model": f"tiny llama {LAYERS}x128 pretrained {args.pretrain_steps} steps", "bits": BITS, "ranks": RANKS,
            "group_size": 128, "fine_tune_steps": args.fine_tune_steps, "data": "python-reference"}
    scores = json.loads(args.output.read_text())["scores"] if args.output.is_file() else {}
    genes = [Gene(b, r) for b in BITS for r in RANKS]
    for count, config in enumerate(itertools.product(genes, repeat=LAYERS)):
        key = config_key(config)
        if key not in scores:
            scores[key] = evaluator.evaluate(config, ladder.levels - 1)
        if count % 16 == 15:
            _save(args.output, scores, meta)
            log.info("%d/%d configs", count + 1, len(genes) ** LAYERS)
    _save(args.output, scores, meta)


if __name__ == "__main__":
    main()
