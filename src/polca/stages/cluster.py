"""Stage `cluster`: HDBSCAN over every trajectory kind, with break times per cluster.

Writes, per clustering ``NAME`` (``loss``, ``delta_loss``, ``abs_delta_loss``, ``lca``, or
``<kind>-<basis>`` such as ``polca-hessian``):

* ``clusters/NAME.parquet``: one row per token (per vector and token for projected kinds):
  [vector,] token, label (≥ 0 cluster, -1 noise, -2 filtered token, -3 dropped vector),
  break_step (the token's break time, on every token);
* ``clusters/NAME.breaks.parquet``: per cluster [vector,] cluster, size, break_step (mean of its
  members), hidden (break_step > τ);
* ``clusters/NAME.json``: the parameters that reproduce it (written last: its presence with the
  same parameters marks the clustering done, so a re-run skips it) and per-vector counts.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from polca import cluster as C
from polca.config import ConfigError
from polca.store import StoreError, atomic_write_json, atomic_write_parquet


def run_cluster(ctx, kinds=None, progress: bool = True) -> dict[str, str]:
    """Cluster every requested trajectory kind whose arrays exist; returns name → what happened
    ("written", "done" when skipped as already done, or why it is missing).

    ``ctx`` needs ``run`` (RunDir), ``cfg`` (RunConfig) and, when the ``loss`` array does not
    record its steps, ``checkpoints.steps``.
    """
    cfg = ctx.cfg.cluster
    kinds = list(kinds or cfg.trajectories)
    unknown = [k for k in kinds if k not in C.TRAJECTORY_KINDS]
    if unknown:
        raise ConfigError(f"cluster.trajectories: unknown trajectory kinds {unknown}; choose "
                          f"from {C.TRAJECTORY_KINDS}")
    arrays = ctx.run.arrays()
    loss = arrays.read("loss")
    if not np.isfinite(loss).all():
        raise StoreError("array 'loss' holds NaN (unfinished): run `polca trajectories` first")
    steps = list(arrays.attrs("loss").get("steps") or ctx.checkpoints.steps)
    if len(steps) != loss.shape[1]:
        raise StoreError(f"array 'loss' has {loss.shape[1]} checkpoints but the run has "
                         f"{len(steps)} steps; re-run `polca trajectories`")
    n_tokens = loss.shape[0]
    common = {
        "steps": [int(s) for s in steps], "n_tokens": int(n_tokens),
        "min_cluster_size": cfg.min_cluster_size or C.default_min_cluster_size(n_tokens),
        "min_samples": cfg.min_samples or "round(clustered tokens / 15)",
        "algorithm": "sklearn.cluster.HDBSCAN(algorithm='brute', metric='euclidean')",
        "tau": int(cfg.flat_after if cfg.flat_after is not None
                   else C.flat_after(loss.mean(axis=0), steps)),
        "tau_source": "config" if cfg.flat_after is not None else "90% of mean-loss decrease",
        "delta": int(cfg.break_delta or C.default_break_delta(steps)),
    }
    status = {}
    for name, kind, basis, sources in _jobs(arrays, kinds, status):
        filters = kind in C.LOSS_ALLOCATION_KINDS
        params = dict(common, name=name, kind=kind, basis=basis, sources=list(sources),
                      mean_filter=bool(cfg.mean_filter and filters),
                      token_filter=bool(cfg.token_filter and filters))
        if _done(ctx.run.clusters, name, params):
            status[name] = "done"
            continue
        if kind in C.EXACT_KINDS:
            tokens, breaks, info = _cluster_exact(loss, kind, params, cfg.min_samples)
        else:
            tokens, breaks, info = _cluster_projected(arrays, name, sources, params,
                                                      cfg.min_samples, progress)
        if tokens["token"].nunique() != n_tokens:
            raise StoreError(f"{name}: the arrays {sources} do not have {n_tokens} tokens")
        atomic_write_parquet(ctx.run.clusters / f"{name}.parquet", tokens)
        atomic_write_parquet(ctx.run.clusters / f"{name}.breaks.parquet", breaks)
        hidden = int(breaks["hidden"].sum())
        atomic_write_json(ctx.run.clusters / f"{name}.json", dict(
            params=params, n_clusters=len(breaks), n_hidden=hidden,
            hidden_fraction=hidden / len(breaks) if len(breaks) else None, **info))
        status[name] = "written"
    for name, why in status.items():
        if why.startswith("missing") and progress:
            tqdm.write(f"cluster: skipped {name}, {why}")
    return status


def _jobs(arrays, kinds, status):
    """(name, kind, basis, source arrays) for each requested kind that has its arrays."""
    bases = sorted(arrays.group["polca"].group_keys()) if "polca" in arrays.group else []
    for kind in kinds:
        if kind in C.EXACT_KINDS:
            yield kind, kind, None, ("loss",)
        elif kind == "lca":
            if C.LCA_ARRAY in arrays:
                yield "lca", "lca", None, (C.LCA_ARRAY,)
            else:
                status["lca"] = f"missing: no array {C.LCA_ARRAY} (run `polca decompose`)"
        else:
            found = False
            for basis in bases:
                sources = tuple(f"polca/{basis}/{t}" for t in C.PROJECTED_TERMS[kind])
                if all(s in arrays for s in sources):
                    found = True
                    yield f"{kind}-{basis}", kind, basis, sources
            if not found:
                status[kind] = (f"missing: no basis has arrays polca/<basis>/"
                                f"{{{','.join(C.PROJECTED_TERMS[kind])}}} (run `polca decompose`)")


def _done(folder, name, params) -> bool:
    path = folder / f"{name}.json"
    if not (path.is_file() and (folder / f"{name}.parquet").is_file()):
        return False
    try:
        return json.loads(path.read_text())["params"] == json.loads(json.dumps(params))
    except (json.JSONDecodeError, KeyError):
        return False


def _cluster_exact(loss, kind, params, min_samples):
    labels = C.cluster_trajectories(C.exact_trajectories(loss, kind), params["min_cluster_size"],
                                    min_samples or C.default_min_samples(len(loss)))
    breaks = C.break_times(C.level_curves(loss, kind), params["steps"], params["delta"])
    tokens = pd.DataFrame({"token": np.arange(len(loss)), "label": labels, "break_step": breaks})
    info = {"min_samples_used": int(min_samples or C.default_min_samples(len(loss))),
            "n_noise": int((labels == C.NOISE).sum())}
    return tokens, C.cluster_breaks(labels, breaks, params["tau"]), info


def _cluster_projected(arrays, name, sources, params, min_samples, progress):
    first = arrays.group[sources[0]]
    n_vectors, block = first.shape[0], max(1, first.chunks[0])
    token_frames, break_frames, vectors = [], [], []
    bar = tqdm(total=n_vectors, desc=f"cluster {name}", unit="vec", disable=not progress)
    for v0 in range(0, n_vectors, block):
        terms = sum(np.asarray(arrays.group[s][v0:v0 + block], dtype=np.float64)
                    for s in sources)
        if not np.isfinite(terms).all():
            raise StoreError(f"arrays {list(sources)} hold NaN for vectors {v0}..: the decompose "
                             "stage has not finished; run `polca decompose`")
        projected = C.cumulate(terms)
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
