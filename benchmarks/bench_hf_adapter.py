"""Cost of one interval's first + second directional derivatives: HF adapter vs built-in Decoder.

Same shape for both (GPT-2 config with the Decoder's width, depth, heads, MLP, vocabulary and
context; untied head, exact GELU), same probe batch and directions, float64, forward engine.
Prints seconds per call (best of ``--repeats``) and the ratio.

    .venv/bin/python benchmarks/bench_hf_adapter.py [--sequences 256] [--directions 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from polca.directional import directional_derivatives
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig
from polca.models.hf import HFTokenLoss


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=12)
    parser.add_argument("--context", type=int, default=12)
    parser.add_argument("--scored", type=int, default=4, help="scored tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    decoder = Decoder(DecoderConfig(vocab_size=args.vocab, context_length=args.context,
                                    n_layers=args.layers, d_model=args.d_model,
                                    n_heads=args.heads)).double()
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=args.vocab, n_positions=args.context, n_embd=args.d_model,
        n_layer=args.layers, n_head=args.heads, n_inner=4 * args.d_model,
        activation_function="gelu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )).double()
    ids = torch.randint(0, args.vocab, (args.sequences, args.context))
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, -args.scored - 1 : -1] = True
    batch = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)

    rows = []
    for name, loss, model in (("built-in Decoder", ModuleTokenLoss(decoder), decoder),
                              ("HF GPT-2 adapter", HFTokenLoss(gpt2), gpt2)):
        theta = loss.space.flatten(dict(model.named_parameters())).detach()
        directions = torch.linalg.qr(torch.randn(loss.space.dim, args.directions,
                                                 dtype=torch.float64))[0].T
        seconds = best_time(lambda loss=loss, theta=theta, directions=directions:
                            directional_derivatives(loss, theta, directions, batch, order=2,
                                                    engine="forward"), args.repeats)
        rows.append((name, loss.space.dim, seconds))
    print(f"{args.sequences} sequences x {args.scored} scored tokens, {args.directions} "
          f"directions, order 2, forward engine, float64, {args.threads} thread(s)")
    for name, dim, seconds in rows:
        print(f"{name:18s} d={dim:8d}  {seconds:8.3f} s  ratio {seconds / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
