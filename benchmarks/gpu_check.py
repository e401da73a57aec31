"""CUDA against float64 CPU, the paper-shape decomposition's time per interval, and the paper
run: the stages of ``benchmarks/gpu_check.sh`` (see there for the time budget).

    python benchmarks/gpu_check.py check --device cuda          # (i)   ~1 minute
    python benchmarks/gpu_check.py time --device cuda           # (ii)  ~3 minutes
    python benchmarks/gpu_check.py check --device cpu           # the same comparison on a CPU

(i) ``check``: a tiny decoder (2 layers, d_model 32) on 64 addition tokens and a random
orthonormal basis of 4 vectors. For every arithmetic (float64, float32, tf32, bfloat16) the
token losses, the first and second directional derivatives ⟨b, ∇ℓ_x⟩ and bᵀ∇²ℓ_x b, and one
interval's POLCA terms (first order, exact and paper second order, integrated, Fisher) are
computed on ``--device`` and compared with the same quantities in float64 on the CPU. The
error of a quantity is max |device − reference| / max |reference| over its entries; the
tolerance of an arithmetic is fixed in advance at 100 × the unit roundoff of its matrix-product
inputs (float64 2⁻⁵³, float32 2⁻²⁴, tf32 2⁻¹¹, bfloat16 2⁻⁸), the same for every quantity.

(ii) ``time``: the paper's addition shape (``configs/paper-addition.toml``: 3 layers,
d_model 512, 9.5M parameters, 1250 probe problems = 5000 scored tokens, m = 50 basis vectors,
exact and paper curvature, integrated, Fisher, decompose.batch_size 1250) on random weights
3 checkpoints apart; the wall time of each interval of a block of 2 (the second interval is the
steady state: no warm-up, its start checkpoint's derivatives shared with the first), of the
LCA baselines per interval, of the token losses per checkpoint, and of one Hessian-vector
product on the 1250-problem basis sample. ``--shape tiny`` runs the same code at the tiny shape
(seconds, for a test on a CPU).

Results are printed as JSON (``--out FILE`` writes them too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from polca.bases import Basis, random_basis
from polca.config import parse_config
from polca.curvature import HessianOperator
from polca.decompose import TermOptions, block_terms, interval_terms, lca_block_terms
from polca.directional import directional_derivatives
from polca.functional import ModuleTokenLoss, ProbeBatch, token_losses
from polca.models.decoder import Decoder, DecoderConfig
from polca.precision import arithmetic, model_dtype
from polca.tasks import make_task

ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "bfloat16": 2.0**-8}
TOLERANCE = {name: 100 * u for name, u in ROUNDOFF.items()}
SHAPES = {  # the decoder, the probe problems, the basis size
    "tiny": ({"n_layers": 2, "d_model": 32, "n_heads": 4, "d_mlp": 64}, 16, 4),
    # the demo's decoder, and one twice as wide: the cost model's CPU measurements
    "demo": ({"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 256}, 64, 8),
    "wide": ({"n_layers": 2, "d_model": 128, "n_heads": 4, "d_mlp": 512}, 128, 16),
    "paper": ({"n_layers": 3, "d_model": 512, "n_heads": 4, "d_mlp": 2048}, 1250, 50),
}
TERMS = ("first", "second_exact", "second_paper", "integrated", "fisher")


def setup(shape: str, seed: int = 0):
    """``(loss float64 on the CPU, checkpoints [3, d], basis, probe)`` at ``shape``."""
    model_cfg, n_probe, m = SHAPES[shape]
    task = make_task(parse_config({"name": "gpu-check", "task": {"n_probe": n_probe}}))
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(vocab_size=task.vocab_size,
                                  context_length=task.sequence_length, **model_cfg)).double()
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    generator = torch.Generator().manual_seed(seed + 1)
    steps = [0.01 * torch.randn(theta.shape, generator=generator, dtype=torch.float64)
             for _ in range(2)]
    thetas = torch.stack([theta, theta + steps[0], theta + steps[0] + steps[1]])
    basis = random_basis(theta.numel(), m, seed=seed)
    basis = Basis(basis.name, basis.kind, basis.vectors, [{"eigenvalue": 1.0}] * m)
    return loss, thetas, basis, ProbeBatch.from_tables(*task.probe_set())


def on(loss: ModuleTokenLoss, device: str, name: str) -> ModuleTokenLoss:
    """The seam on a copy of the model on ``device`` in the arithmetic ``name``."""
    import copy

    return ModuleTokenLoss(copy.deepcopy(loss.module).to(device=device, dtype=model_dtype(name)))


def quantities(loss, thetas, basis, probe, device: str, name: str) -> dict[str, torch.Tensor]:
    """Losses, directional derivatives and one interval's terms, float64 on the CPU."""
    dtype = model_dtype(name)
    probe = probe.to(device)
    theta = thetas[0].to(device)
    with arithmetic(name), torch.no_grad():
        losses = token_losses(loss, theta.to(dtype), probe)
    with arithmetic(name):
        grad, curvature = directional_derivatives(
            loss, theta.to(dtype), basis.vectors.to(device=device, dtype=dtype), probe, order=2)
    terms = interval_terms(loss, theta, thetas[1].to(device), basis, probe,
                           TermOptions(dtype=name, batch_size=len(probe)))
    out = {"losses": losses, "grad": grad, "curvature": curvature,
           **{t: getattr(terms, t) for t in TERMS}}
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def check(device: str, names=tuple(ROUNDOFF)) -> dict:
    """Errors of every quantity and arithmetic on ``device`` against float64 on the CPU, with
    the tolerances; ``passed`` says whether every error is within its tolerance."""
    loss, thetas, basis, probe = setup("tiny")
    reference = quantities(loss, thetas, basis, probe, "cpu", "float64")
    results = {}
    for name in names:
        got = quantities(on(loss, device, name), thetas, basis, probe, device, name)
        errors = {k: relative_error(got[k], reference[k]) for k in reference}
        results[name] = {"tolerance": TOLERANCE[name], "errors": errors,
                         "passed": all(e <= TOLERANCE[name] for e in errors.values())}
    return {"device": device, "results": results,
            "passed": all(r["passed"] for r in results.values())}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, name: str = "float64", shape: str = "paper") -> dict:
    """Seconds per interval of the decomposition (and its parts) at ``shape`` on ``device``."""
    loss, thetas, basis, probe = setup(shape)
    loss = on(loss, device, name)
    probe, thetas = probe.to(device), thetas.to(device)
    options = TermOptions(dtype=name, batch_size=len(probe))
    out = {"device": device, "arithmetic": name, "shape": shape, "parameters": thetas.shape[1],
           "tokens": probe.n_tokens, "vectors": len(basis)}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    _sync(device)
    intervals, start = [], time.perf_counter()
    for _ in block_terms(loss, iter(thetas), basis, probe, options):
        _sync(device)
        intervals.append(time.perf_counter() - start)
        start = time.perf_counter()
    out["polca_first_interval_s"], out["polca_interval_s"] = intervals
    top = torch.arange(50, device=device)
    start = time.perf_counter()
    for _ in lca_block_terms(loss, iter(thetas[:2]), top, probe, options):
        _sync(device)
    out["lca_interval_s"] = time.perf_counter() - start
    dtype = model_dtype(name)
    with arithmetic(name), torch.no_grad():
        start = time.perf_counter()
        token_losses(loss, thetas[0].to(dtype), probe, options.batch_size)
        _sync(device)
    out["losses_checkpoint_s"] = time.perf_counter() - start
    hessian = HessianOperator(loss, thetas[0].to(dtype), probe, batch_size=len(probe),
                              dtype=dtype)
    vector = torch.randn(thetas.shape[1], dtype=dtype, device=device)
    with arithmetic(name):
        hessian @ vector  # the first product may build and keep the gradient graphs
        _sync(device)
        start = time.perf_counter()
        hessian @ vector
        _sync(device)
    out["hvp_s"] = time.perf_counter() - start
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("check", "time"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float64", choices=sorted(ROUNDOFF),
                        help="the arithmetic timed by `time`")
    parser.add_argument("--shape", default="paper", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = check(args.device) if args.stage == "check" else timed(args.device, args.dtype,
                                                                     args.shape)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
