"""Write the bundled arithmetic task as chat conversations: `arithmetic-chat.jsonl` to train on and
`arithmetic-chat-held-out.jsonl` to hold out, one `{"messages": [...]}` line per conversation.

Each conversation is a system prompt, then one to three questions of the task, each a user turn answered by
an assistant turn with the number alone. The questions are those of `qra.runtime.data.arithmetic` (seed 0),
distinct, none of the held-out ones among the training ones. Run from the repository root:

    .venv/bin/python examples/arithmetic_chat.py [--out examples]
"""

import argparse
import json
import logging
import random
from pathlib import Path

from qra.runtime.data import Example, arithmetic

log = logging.getLogger("arithmetic_chat")

SYSTEM = "You are a calculator. Answer each question with the number alone."
TRAIN_QUESTIONS, HELD_OUT_QUESTIONS = 600, 120


def conversations(examples: list[Example], seed: int) -> list[dict]:
    """The examples in order, grouped into conversations of one to three questions (sizes drawn by `seed`)."""
    rng = random.Random(seed)
    records, start = [], 0
    while start < len(examples):
        size = rng.randint(1, 3)
        messages = [{"role": "system", "content": SYSTEM}]
        for example in examples[start : start + size]:
            question = example.prompt.removeprefix("Q: ").removesuffix("\nA:")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": example.response.strip()}]
        records.append({"messages": messages})
        start += size
    return records


def write(folder: Path) -> list[Path]:
    """Write both files into `folder`; returns their paths."""
    task = arithmetic(seed=0, train_size=TRAIN_QUESTIONS, held_out_size=HELD_OUT_QUESTIONS)
    paths = []
    for name, examples, seed in (("arithmetic-chat.jsonl", task.train, 0), ("arithmetic-chat-held-out.jsonl", task.held_out, 1)):
        path = folder / name
        path.write_text("".join(json.dumps(record) + "\n" for record in conversations(examples, seed)), encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder to write the two files to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write(args.out):
        log.info("wrote %s: %d conversations", path, len(path.read_text(encoding="utf-8").splitlines()))


if __name__ == "__main__":
    main()
