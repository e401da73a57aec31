"""Stage `cluster`: HDBSCAN over every trajectory kind, with break times per cluster.

For every requested kind of :data:`polca.store.TRAJECTORY_KINDS` whose arrays exist (a kind
with a basis once per decomposed basis) it writes a clustering ``NAME`` (``loss``,
``delta_loss``, ``lca``, ``polca-hessian``, ...) through the contract
(:meth:`polca.store.RunDir.write_clustering`): labels per token (per vector and token for
kinds with a basis; ≥ 0 cluster, -1 noise, -2 filtered token, -3 dropped vector) with each
token's break time, a per-cluster table (size, mean break step, hidden), and the parameters
that reproduce it. A clustering whose inputs (the arrays it reads and its parameters) are
unchanged is kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polca import cluster as C
from polca import progress as P
from polca.config import ConfigError
from polca.store import LOSS, TRAJECTORY_KINDS, StoreError, clustering_name, kind_arrays


def run_cluster(ctx, kinds=None, progress: bool = True) -> dict[str, str]:
    """Cluster every requested trajectory kind whose arrays exist; returns name → what happened
    ("written", "done" when kept as already done, or why it is missing).

    ``ctx`` needs ``run`` (RunDir) and ``cfg`` (RunConfig).
    """
    cfg = ctx.cfg.cluster
    run = ctx.run
    kinds = list(kinds or cfg.trajectories)
    unknown = [k for k in kinds if k not in TRAJECTORY_KINDS]
    if unknown:
        raise ConfigError(f"cluster.trajectories: unknown trajectory kinds {unknown}; choose "
                          f"from {list(TRAJECTORY_KINDS)}")
    arrays = run.arrays()
    loss = arrays.read(LOSS)
    if not np.isfinite(loss).all():
        raise StoreError("array 'loss' holds NaN (unfinished): run `polca trajectories` first")
    steps = run.array_steps(LOSS)
    if steps is None or len(steps) != loss.shape[1]:
        raise StoreError(f"array 'loss' has {loss.shape[1]} checkpoints but records steps "
                         f"{steps}; re-run `polca trajectories`")
    n_tokens = loss.shape[0]
    common = {
        "steps": steps, "n_tokens": int(n_tokens),
        "min_cluster_size": cfg.min_cluster_size or C.default_min_cluster_size(n_tokens),
        "min_samples": cfg.min_samples or "round(0.00375 × clustered tokens)",
        "algorithm": "sklearn.cluster.HDBSCAN(algorithm='brute', metric='euclidean')",
        "tau": int(cfg.flat_after if cfg.flat_after is not None
                   else C.flat_after(loss.mean(axis=0), steps)),
        "tau_source": "config" if cfg.flat_after is not None else "90% of mean-loss decrease",
        "delta": int(cfg.break_delta or C.default_break_delta(steps)),
    }
    status = {}
    for name, kind, basis, sources in _jobs(run, kinds, status):
        spec = TRAJECTORY_KINDS[kind]
        params = dict(common, name=name, kind=kind, basis=basis, sources=list(sources),
                      mean_filter=bool(cfg.mean_filter and spec.allocation),
                      token_filter=bool(cfg.token_filter and spec.allocation))
        products = ["trajectories"] + ([f"decompose/{basis or 'lca'}"]
                                       if spec.source != "loss" else [])
        inputs = {"params": params, "arrays": {p: run.version(p) for p in products}}
        if run.is_current(f"cluster/{name}", inputs) and run.has_clustering(name):
            status[name] = "done"
            P.bar(False, 1, 1, f"cluster {name}", "clustering").close()  # counted, not drawn
            continue
        run.refresh(f"cluster/{name}", inputs, discard=lambda name=name: run.discard_clustering(
            name), exists=run.has_clustering(name))
        if spec.source == "loss":
            with P.bar(False, 1, 0, f"cluster {name}", "clustering") as bar:
                tokens, breaks, info = _cluster_exact(loss, kind, params, cfg.min_samples)
                bar.update()
        else:
            tokens, breaks, info = _cluster_projected(run, name, kind, basis, params,
                                                      cfg.min_samples, progress)
        if tokens["token"].nunique() != n_tokens:
            raise StoreError(f"{name}: the arrays {sources} do not have {n_tokens} tokens")
        hidden = int(breaks["hidden"].sum())
        run.write_clustering(name, tokens, breaks, dict(
            params=params, n_clusters=len(breaks), n_hidden=hidden,
            hidden_fraction=hidden / len(breaks) if len(breaks) else None, **info))
        status[name] = "written"
    for name, why in status.items():
        if why.startswith("missing") and progress:
            P.say(f"cluster: skipped {name}, {why}")
    return status



def _jobs(run, kinds, status):
    """(name, kind, basis, source arrays) for each requested kind that has its arrays."""
    arrays = run.arrays()
    bases = run.decomposed_bases()
    for kind in kinds:
        spec = TRAJECTORY_KINDS[kind]
        if spec.source != "terms":
            sources = kind_arrays(kind)
            if all(s in arrays for s in sources):
                yield kind, kind, None, sources
            else:
                status[kind] = f"missing: no array {sources[0]} (run `polca decompose`)"
            continue
        found = False
        for basis in bases:
            sources = kind_arrays(kind, basis)
            if all(s in arrays for s in sources):
                found = True
                yield clustering_name(kind, basis), kind, basis, sources
        if not found:
            status[kind] = (f"missing: no basis has arrays polca/<basis>/"
                            f"{{{','.join(spec.terms)}}} (run `polca decompose`)")


def _cluster_exact(loss, kind, params, min_samples):
    labels = C.cluster_trajectories(C.exact_trajectories(loss, kind), params["min_cluster_size"],
                                    min_samples or C.default_min_samples(len(loss)))
    breaks = C.break_times(C.level_curves(loss, kind), params["steps"], params["delta"])
    tokens = pd.DataFrame({"token": np.arange(len(loss)), "label": labels, "break_step": breaks})
    info = {"min_samples_used": int(min_samples or C.default_min_samples(len(loss))),
            "n_noise": int((labels == C.NOISE).sum())}
    return tokens, C.cluster_breaks(labels, breaks, params["tau"]), info


def _cluster_projected(run, name, kind, basis, params, min_samples, progress):
    arrays = run.arrays()
    first = kind_arrays(kind, basis)[0]
    n_vectors, block = arrays.shape(first)[0], max(1, arrays.chunks(first)[0])
    token_frames, break_frames, vectors = [], [], []
    bar = P.bar(progress, n_vectors, 0, f"cluster {name}", "vector")
    for v0 in range(0, n_vectors, block):
        projected = run.projected(kind, basis, slice(v0, v0 + block))
        if not np.isfinite(projected).all():
            raise StoreError(f"arrays {list(kind_arrays(kind, basis))} hold NaN for vectors "
                             f"{v0}..: the decompose stage has not finished; run "
                             "`polca decompose`")
        for i, trajectories in enumerate(projected):
            v = v0 + i
            labels, used = C.cluster_projected(
                trajectories[None], params["min_cluster_size"], min_samples,
                params["mean_filter"], params["token_filter"])
            labels = labels[0]
            breaks = C.break_times(trajectories.T, params["steps"], params["delta"])
            token_frames.append(pd.DataFrame({"vector": v, "token": np.arange(len(labels)),
                                              "label": labels, "break_step": breaks}))
            table = C.cluster_breaks(labels, breaks, params["tau"])
            break_frames.append(table.assign(vector=v)[["vector", *table.columns]])
            vectors.append({
                "vector": v, "kept": bool((labels != C.DROPPED).any()),
                "mean_final": float(trajectories[-1].mean()),
                "n_filtered": int((labels == C.FILTERED).sum()),
                "min_samples_used": int(used[0]),
                "n_noise": int((labels == C.NOISE).sum()),
                "n_clusters": len(table),
            })
            bar.update()
    bar.close()
    return (pd.concat(token_frames, ignore_index=True),
            pd.concat(break_frames, ignore_index=True), {"vectors": vectors})
