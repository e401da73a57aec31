"""Hugging Face adapter costs, each side by side with its alternative in one process.

Default: one interval's first + second directional derivatives, HF adapter vs built-in Decoder.
Same shape for both (GPT-2 config with the Decoder's width, depth, heads, MLP, vocabulary and
context; untied head, exact GELU), same probe batch and directions, float64, forward engine.
Prints seconds per call (best of ``--repeats``) and the ratio.

``--loading``: reading one checkpoint of a series into float64 parameters. ``series.load`` runs
a whole ``from_pretrained`` per checkpoint (model built on the meta device, then filled);
against it, the floor (safetensors read + cast, which knows no renamed or tied keys) and
transformers' own loader run into one kept model instance (``_load_pretrained_model``, a
private API: the cheaper exact path this measurement decides against or for). Pythia-70m's
shape (width 512, 6 layers, vocabulary 50,304, float16 files) by default.

    .venv/bin/python benchmarks/bench_hf_adapter.py [--sequences 256] [--directions 4]
    .venv/bin/python benchmarks/bench_hf_adapter.py --loading [--load-width 512 --load-layers 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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


def loading(args) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from polca.models.hf import _quiet_transformers, hf_series

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=args.load_width, num_hidden_layers=args.load_layers,
                           num_attention_heads=8, intermediate_size=4 * args.load_width,
                           max_position_embeddings=2048, rotary_pct=0.25)
    with tempfile.TemporaryDirectory() as root:
        model = AutoModelForCausalLM.from_config(config).half()
        for step in (0, 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            model.save_pretrained(Path(root) / f"step{step}")
        d = sum(p.numel() for p in model.parameters())
        series = hf_series(str(Path(root) / "step*"))
        path = series.paths[1]
        kept = series.model()

        def into_kept_model():
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.modeling_utils import LoadStateDictConfig

            with _quiet_transformers():
                cfg = LoadStateDictConfig(dtype=torch.float64,
                                          weight_mapping=get_model_conversion_mapping(kept))
                type(kept)._load_pretrained_model(kept, None, [str(path / "model.safetensors")],
                                                  cfg)
            return {n: p.detach() for n, p in kept.named_parameters()}

        rows = [("from_pretrained per checkpoint (polca)", lambda: series._read(path)),
                ("floor: safetensors read + cast", lambda: {
                    k: v.double() for k, v in load_file(path / "model.safetensors").items()}),
                ("from_pretrained's loader into one kept model", into_kept_model),
                ("series.load (+ StateSeries' NaN/inf check)", lambda: series.load(1))]
        assert all(torch.equal(a, b) for a, b in zip(series.load(1).values(),
                                                     into_kept_model().values()))
        times = [(name, best_time(fn, args.repeats)) for name, fn in rows]
    print(f"one checkpoint, d={d:,}, float16 file -> float64, {args.threads} thread(s), best of "
          f"{args.repeats}")
    for name, seconds in times:
        print(f"{name:46s} {seconds:7.3f} s  ratio {seconds / times[0][1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loading", action="store_true", help="time checkpoint loading")
    parser.add_argument("--load-width", type=int, default=512, help="--loading: model width")
    parser.add_argument("--load-layers", type=int, default=6, help="--loading: model depth")
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
    if args.loading:
        loading(args)
        return

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
