"""Make a tiny training run to try `polca analyze` on, offline, in a few seconds.

The task: six random letters, a separator, then the same six letters again. Copying the second
half needs an induction-like mechanism, learned after the first half's statistics — two skills
learned at different times. Every probe token is labelled ``role`` = ``first`` / ``sep`` /
``copy``, so clusters can be scored against it.

    python examples/tiny_run.py /tmp/tiny              # a GPT-2 series (needs transformers)
    python examples/tiny_run.py /tmp/tiny --plain      # a plain nn.Module series (TinyLM)

writes into the folder:

* ``checkpoints/checkpoint-<step>/`` (``save_pretrained`` folders with ``tokenizer.json``), or
  with ``--plain`` ``checkpoints/step_<step>.safetensors``;
* ``tokenizer.json`` (a word-level tokenizer: one token per letter);
* ``probe.jsonl`` (held-out examples as ``words`` with per-word ``role`` labels) and
  ``train.jsonl`` (training examples, for the Hessian sample).

Then, for example:

    polca analyze --hf "/tmp/tiny/checkpoints/checkpoint-*" --probe /tmp/tiny/probe.jsonl \\
        --basis-sample /tmp/tiny/train.jsonl --name tiny-gpt2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LETTERS = list("abcdefghijklmnop")
SEPARATOR = "|"
HALF = 6


def make_tokenizer():
    """A word-level ``tokenizers.Tokenizer``: one id per letter, the separator and ``[UNK]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*LETTERS, SEPARATOR, "[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def make_examples(rng: np.random.Generator, n: int) -> list[dict]:
    """``n`` examples ``{"words": [...], "role": [...]}`` (letters, separator, letters again)."""
    out = []
    for _ in range(n):
        first = list(rng.choice(LETTERS, HALF))
        out.append({"words": [*first, SEPARATOR, *first],
                    "role": ["first"] * HALF + ["sep"] + ["copy"] * HALF})
    return out


class TinyLM(nn.Module):
    """A one-layer causal transformer from primitives (input_ids ``[batch, seq]`` → logits
    ``[batch, seq, vocab]``); no ``nn.LayerNorm``, whose forward-mode second derivative is
    wrong in PyTorch, so the exact curvature holds."""

    def __init__(self, vocab_size: int = len(LETTERS) + 2, width: int = 32, context: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(0.1 * torch.randn(context, width))
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp_in, self.mlp_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.embed(input_ids) + self.position[:seq]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        x = x + torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        x = x + self.mlp_out(F.gelu(self.mlp_in(x)))
        return self.head(x)


def tiny_gpt2(vocab_size: int = len(LETTERS) + 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32,
                                      n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))


def make_run(out: str | Path, plain: bool = False, steps: int = 300, every: int = 50,
             seed: int = 0) -> Path:
    """Train a tiny model on the copy task, saving a checkpoint every ``every`` steps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokenizer = make_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    for name, n in (("train.jsonl", 512), ("probe.jsonl", 40)):
        (out / name).write_text("".join(json.dumps(e) + "\n" for e in make_examples(rng, n)))
    train = [tokenizer.encode(e["words"], is_pretokenized=True).ids
             for e in map(json.loads, (out / "train.jsonl").read_text().splitlines())]
    data = torch.tensor(train)
    torch.manual_seed(seed)
    model = TinyLM() if plain else tiny_gpt2()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    folder = out / "checkpoints"
    for step in range(steps + 1):
        if step % every == 0:
            save(model, folder, step, out / "tokenizer.json", plain)
        if step == steps:
            break
        batch = data[torch.as_tensor(rng.integers(0, len(data), 32))]
        logits = model(batch) if plain else model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               batch[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return folder


def save(model: nn.Module, folder: Path, step: int, tokenizer: Path, plain: bool) -> None:
    if plain:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / f"step_{step}.safetensors"), metadata={"step": str(step)})
        return
    from transformers.utils import logging

    logging.disable_progress_bar()
    target = folder / f"checkpoint-{step}"
    model.save_pretrained(target)
    (target / "tokenizer.json").write_bytes(tokenizer.read_bytes())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the run into")
    parser.add_argument("--plain", action="store_true", help="a plain nn.Module (TinyLM)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(make_run(args.out, plain=args.plain, steps=args.steps, every=args.every))
