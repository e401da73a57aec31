"""Bring your own run: `polca analyze` and `polca.Run` on checkpoint series made here.

Oracle: the first-order POLCA term G[b, t, x] = ⟨b, ∇ℓ_x(θ_t)⟩·⟨b, θ_{t+1} − θ_t⟩ recomputed
with one ``torch.autograd.grad`` per token on the *plain* model (Hugging Face's own modules,
weights loaded by ``from_pretrained``/``load_state_dict``, tokens read from the probe file
with the tokenizer), never through polca's adapter, probe tables or checkpoint readers.
"""

import importlib.util
import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import polca
from polca.cli import app
from polca.config import ConfigError
from polca.store import sha256_json

LETTERS = list("abcdefgh")
VOCAB = [*LETTERS, "|", "[UNK]"]
STEPS = (0, 10, 20, 30)
# the stages that produce G, without the optional arrays (faster)
FIRST_ONLY = {"basis": {"kinds": ["hessian"]},
              "decompose": {"curvature": ["exact"], "integrated": False, "fisher": False,
                            "lca": False}}

PLAIN_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Causal running mean of token embeddings, a tanh layer and a head."""

    def __init__(self, vocab_size=10, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        return self.head(torch.tanh(self.mix(x.cumsum(1) / counts)))


def make_model(width=8):
    return Tiny(width=width)


def half_loss(logits, batch):
    from polca.functional import next_token_losses
    return 0.5 * next_token_losses(logits, batch)
'''


class Evil:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# -- a tiny run: copy task data, a tokenizer, GPT-2 and plain-module checkpoint series ---------

def copy_examples(seed: int, n: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        first = [LETTERS[i] for i in torch.randint(0, len(LETTERS), (4,), generator=generator)]
        out.append({"words": [*first, "|", *first], "role": ["first"] * 4 + ["sep"] + ["copy"] * 4})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode(examples) -> torch.Tensor:
    return torch.tensor([[VOCAB.index(w) for w in e["words"]] for e in examples])


def train_and_save(model, logits_of, save, data: torch.Tensor):
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            save(model, step)
        logits = logits_of(model, data)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, len(VOCAB)), data[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def gpt2(n_embd: int = 8):
    config = transformers.GPT2Config(vocab_size=len(VOCAB), n_positions=12, n_embd=n_embd,
                                     n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def save_gpt2_series(folder: Path, model) -> None:
    transformers.utils.logging.disable_progress_bar()
    train_and_save(model, lambda m, ids: m(input_ids=ids).logits,
                   lambda m, step: m.save_pretrained(folder / f"checkpoint-{step}"),
                   encode(copy_examples(1, 64)))


def load_module_file(path: Path):
    spec = importlib.util.spec_from_file_location("tiny_plain_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(root / "tokenizer.json"))
    probe = write_jsonl(root / "probe.jsonl", copy_examples(2, 6))
    sample = write_jsonl(root / "train.jsonl", copy_examples(3, 8))
    save_gpt2_series(root / "gpt2", gpt2())
    (root / "plain_model.py").write_text(PLAIN_MODEL)
    plain = load_module_file(root / "plain_model.py").make_model()

    def save_plain(model, step):
        (root / "plain").mkdir(exist_ok=True)
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  str(root / "plain" / f"step_{step}.safetensors"))

    train_and_save(plain, lambda m, ids: m(ids), save_plain, encode(copy_examples(1, 64)))
    return {"root": root, "tokenizer": root / "tokenizer.json", "probe": probe,
            "sample": sample, "gpt2": root / "gpt2", "plain": root / "plain",
            "model_file": root / "plain_model.py"}


# -- the oracle ---------------------------------------------------------------------------------

def oracle_first(theta_of, token_losses, vectors: torch.Tensor) -> torch.Tensor:
    """``[vector, interval, token]`` ⟨b, ∇ℓ_x(θ_t)⟩·⟨b, Δθ_t⟩ by a per-token autograd loop."""
    thetas = [theta_of(step) for step in STEPS]
    out = []
    for t in range(len(STEPS) - 1):
        params, flat = thetas[t]
        grads = []
        for loss in token_losses(params):
            grad = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            grads.append(torch.cat([g.reshape(-1) for g in grad]))
        delta = thetas[t + 1][1] - flat
        out.append((torch.stack(grads) @ vectors.T).T * (vectors @ delta)[:, None])
    return torch.stack(out, dim=1)


def per_token_cross_entropy(logits_of, probe: Path, scale: float = 1.0):
    ids = encode([json.loads(line) for line in probe.read_text().splitlines()])

    def losses(params):
        logits = logits_of(params, ids)
        return [scale * F.cross_entropy(logits[s, i - 1], ids[s, i])
                for s in range(ids.shape[0]) for i in range(1, ids.shape[1])]

    return losses


def hf_theta(folder: Path):
    def theta_of(step):
        model = transformers.GPT2LMHeadModel.from_pretrained(folder / f"checkpoint-{step}")
        params = dict(model.double().named_parameters())
        return params, torch.cat([p.detach().reshape(-1) for p in params.values()])

    return theta_of


def test_polca_through_the_hf_adapter_equals_per_token_autograd(data, tmp_path):
    run = polca.Run.from_hf(str(data["gpt2"] / "checkpoint-*"), data["probe"], name="g",
                            runs=tmp_path, basis_sample=data["sample"], config=FIRST_ONLY,
                            tokenizer=data["tokenizer"], tokens_per_step=512)
    run.progress = False
    run.trajectories().basis().decompose()
    # the tokens seen per checkpoint: recorded with the series and an x axis of the results
    seen = [512 * step for step in STEPS]
    assert run.loss_.coords["tokens_seen"].values.tolist() == seen
    assert run.terms_["hessian"].coords["tokens_seen_end"].values.tolist() == seen[1:]
    source = json.loads((run.root / "source.json").read_text())
    assert [c["tokens_seen"] for c in source["checkpoints"]] == seen
    vectors = load_file(str(run.root / "basis" / "hessian.safetensors"))["vectors"]
    assert vectors.shape[0] == len(STEPS) - 1  # one eigenvector per checkpoint after the first
    first = torch.from_numpy(run.terms_["hessian"]["first"].to_numpy())

    model = gpt2().double().eval()  # eval: no dropout

    def logits_of(params, ids):
        with sdpa_kernel(SDPBackend.MATH):  # HF's own SDPA attention, reverse mode only
            return torch.func.functional_call(model, params, args=(),
                                              kwargs={"input_ids": ids}).logits

    def theta_of(step):
        params, flat = hf_theta(data["gpt2"])(step)
        return {n: p.detach().requires_grad_() for n, p in params.items()}, flat

    expected = oracle_first(theta_of, per_token_cross_entropy(logits_of, data["probe"]), vectors)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(first, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


def test_polca_of_a_plain_module_with_its_own_loss_equals_per_token_autograd(data, tmp_path):
    module = load_module_file(data["model_file"])
    run = polca.Run.from_module(module.make_model, str(data["plain"]), data["probe"],
                                loss_fn=module.half_loss, name="p", runs=tmp_path,
                                tokenizer=data["tokenizer"], config=FIRST_ONLY)
    run.progress = False
    run.trajectories().basis().decompose()
    vectors = load_file(str(run.root / "basis" / "hessian.safetensors"))["vectors"]
    first = torch.from_numpy(run.terms_["hessian"]["first"].to_numpy())

    model = module.make_model().double().eval()

    def theta_of(step):
        state = load_file(str(data["plain"] / f"step_{step}.safetensors"))
        params = {n: state[n].double().requires_grad_() for n, _ in model.named_parameters()}
        return params, torch.cat([p.detach().reshape(-1) for p in params.values()])

    def logits_of(params, ids):
        return torch.func.functional_call(model, params, (ids,))

    expected = oracle_first(theta_of, per_token_cross_entropy(logits_of, data["probe"], 0.5),
                            vectors)
    torch.testing.assert_close(first, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())
    # the loss function is held in memory: the config names it, reopening asks for it again
    assert "<in-memory>" in (run.root / "config.toml").read_text()
    with pytest.raises(ConfigError, match="reopen the run the same way"):
        polca.Run(run.root).load()


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes else "")


def test_analyze_cli_writes_a_report_and_the_run_reopens(data, tmp_path):
    result, output = invoke(
        "analyze", "--hf", data["gpt2"] / "checkpoint-*", "--probe", data["probe"],
        "--basis-sample", data["sample"], "--tokenizer", data["tokenizer"],
        "--basis", "hessian,random", "--name", "tiny",
        "--runs", tmp_path, "--set", "decompose.batch_size=4", "--quiet",
        "--set", "cluster.trajectories=['loss', 'polca']")  # fewer figures: a faster report
    assert result.exit_code == 0, output
    root = tmp_path / "tiny"
    assert (root / "report" / "index.html").is_file()
    config = (root / "config.toml").read_text()
    assert 'kind = "hf"' in config and "batch_size = 4" in config
    source = json.loads((root / "source.json").read_text())  # the series as hf_series saw it
    assert [c["step"] for c in source["checkpoints"]] == list(STEPS)
    scores = (root / "evaluation" / "scores.csv").read_text()
    assert "role" in scores  # the probe file's labels reach the evaluation
    again, output = invoke("evaluate", root, "--quiet")  # reopened from the run directory
    assert again.exit_code == 0, output


def test_analyze_cli_with_a_factory_file_runs_the_first_stages(data, tmp_path):
    result, output = invoke(
        "analyze", "--checkpoints", data["plain"] / "step_*.safetensors",
        "--factory", f"{data['model_file']}:make_model", "--loss-fn",
        f"{data['model_file']}:half_loss", "--probe", data["probe"], "--tokenizer",
        data["tokenizer"], "--name", "plain", "--runs", tmp_path, "--quiet",
        "--set", "decompose.lca=false", "--set", "cluster.trajectories=['loss', 'polca']")
    assert result.exit_code == 0, output
    assert (tmp_path / "plain" / "report" / "index.html").is_file()
    assert (tmp_path / "plain" / "clusters" / "polca-hessian.json").is_file()


# -- bad input stops with a clear message and leaves no run directory ----------------------------

def mixed_architectures(data, folder: Path) -> list:
    for step, width in ((0, 8), (10, 16)):
        gpt2(width).save_pretrained(folder / f"checkpoint-{step}")
    return ["--hf", folder / "checkpoint-*", "--probe", data["probe"], "--tokenizer",
            data["tokenizer"]]


def plain_files(data, folder: Path, last: str) -> Path:
    folder.mkdir()
    for step in (0, 10):
        state = load_file(str(data["plain"] / f"step_{step}.safetensors"))
        save_file(state, str(folder / f"step_{step}.safetensors"))
    return folder / last


def missing_step(data, folder: Path) -> list:
    last = plain_files(data, folder, "final.safetensors")
    save_file(load_file(str(data["plain"] / "step_20.safetensors")), str(last))
    return ["--checkpoints", folder, "--factory", f"{data['model_file']}:make_model",
            "--probe", data["probe"], "--tokenizer", data["tokenizer"]]


def unsafe_pickle(data, folder: Path) -> list:
    last = plain_files(data, folder, "step_20.pt")
    state = load_file(str(data["plain"] / "step_20.safetensors"))
    with open(last, "wb") as handle:
        pickle.dump({**state, "extra": Evil(folder / "executed")}, handle)
    return ["--checkpoints", folder, "--factory", f"{data['model_file']}:make_model",
            "--probe", data["probe"], "--tokenizer", data["tokenizer"]]


def wrong_probe(data, folder: Path) -> list:
    folder.mkdir()
    (folder / "probe.jsonl").write_text('{"words": ["a", "b"]}\n["a", "b"]\n')
    return ["--hf", data["gpt2"] / "checkpoint-*", "--probe", folder / "probe.jsonl",
            "--tokenizer", data["tokenizer"]]


@pytest.mark.parametrize("make, message", [
    (mixed_architectures, "different architectures"),
    (missing_step, "no training step for"),
    (unsafe_pickle, "NOT loaded"),
    (wrong_probe, "probe.jsonl:2 is a JSON list, not an object"),
])
def test_bad_runs_stop_with_a_message_and_write_nothing(data, tmp_path, make, message):
    args = make(data, tmp_path / "input")
    result, output = invoke("analyze", *args, "--name", "bad", "--runs", tmp_path / "runs",
                            "--quiet")
    assert result.exit_code == 2, output
    assert "error:" in output and message in output
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "input" / "executed").exists()  # the pickle never ran


def test_analyze_needs_one_checkpoint_source(data, tmp_path):
    result, output = invoke("analyze", "--probe", data["probe"], "--runs", tmp_path)
    assert result.exit_code == 2 and "exactly one of --hf" in output
    result, output = invoke("analyze", "--checkpoints", data["plain"], "--probe", data["probe"],
                            "--runs", tmp_path)
    assert result.exit_code == 2 and "--factory" in output
    assert not any(tmp_path.iterdir())



# -- bring-your-own inputs: long probes, bytes, binary labels -----------------------------------

def labelled_examples(seed: int, n: int, extra: int = 0) -> list[dict]:
    """Copy examples with a boolean per-token label ``copied`` (the copied half); ``extra``
    more words make an example longer than the model's context of 12."""
    out = []
    for example in copy_examples(seed, n):
        words = example["words"] + ["a"] * extra
        role = example["role"] + ["copy"] * extra
        out.append({"words": words, "role": role, "copied": [r == "copy" for r in role]})
    return out


def test_a_probe_longer_than_the_context_is_an_error_or_a_counted_truncation(data, tmp_path):
    examples = labelled_examples(4, 6, extra=5)  # 14 words: 2 beyond n_positions = 12
    probe = write_jsonl(tmp_path / "long.jsonl", examples)
    args = ["analyze", "--hf", data["gpt2"] / "checkpoint-*", "--probe", probe, "--tokenizer",
            data["tokenizer"], "--name", "long", "--runs", tmp_path / "runs", "--quiet"]
    result, output = invoke(*args)
    assert result.exit_code == 2, output
    assert "error:" in output and "longer than the context of 12" in output
    assert "Traceback" not in output and not (tmp_path / "runs").exists()

    # the basis sample is cut to the context too (it only feeds the Hessian)
    result, output = invoke(*args, "--truncate", "--basis-sample", probe, "--basis",
                            "random,hessian", "--label", "role=copy",
                            "--set", "decompose.lca=false",
                            "--set", "cluster.trajectories=['loss', 'polca']",
                            "--set", "cluster.min_cluster_size=3")
    assert result.exit_code == 0, output
    # every word after the first is scored; those at positions 12 and 13 lie beyond the context
    dropped = sum(len(e["words"][12:]) for e in examples)
    assert f"({dropped} scored tokens beyond the context dropped)" in output

    # the user's labels: role (named, positive "copy") and copied (a boolean, auto-detected)
    root = tmp_path / "runs" / "long"
    assert not (root / "evaluation" / "carry.csv").exists()
    tokens = polca.Run(root).load().tokens_
    for column, positive in (("role", "copy"), ("copied", True)):
        table = pd.read_csv(root / "evaluation" / f"label-{column}.csv")
        assert len(table) and set(table["label"]) == {column}
        for name, rows in table.groupby("name"):
            labels = pd.read_parquet(root / "clusters" / f"{name}.parquet")
            best = rows.sort_values("rank").iloc[0]
            members = labels[labels["label"] == best["cluster"]]
            if not pd.isna(best["vector"]):
                members = members[members["vector"] == best["vector"]]
            in_cluster = tokens.set_index("token").loc[members["token"], column]
            homogeneity = float((in_cluster == positive).mean())  # brute force
            assert best["homogeneity"] == pytest.approx(homogeneity)
            clustered = labels if pd.isna(best["vector"]) else labels[
                labels["vector"] == best["vector"]]
            clustered = clustered[clustered["label"] >= 0]
            all_positive = (tokens.set_index("token").loc[clustered["token"], column]
                            == positive).sum()
            assert best["recall"] == pytest.approx((in_cluster == positive).sum() / all_positive)


def test_a_probe_that_is_not_utf8_names_the_byte(data, tmp_path):
    probe = tmp_path / "latin1.jsonl"
    good = json.dumps(copy_examples(5, 1)[0]) + "\n"
    probe.write_bytes(good.encode() + '{"text": "café"}\n'.encode("latin-1"))
    result, output = invoke("analyze", "--hf", data["gpt2"] / "checkpoint-*", "--probe", probe,
                            "--tokenizer", data["tokenizer"], "--runs", tmp_path / "runs")
    offset = len(good.encode()) + len('{"text": "caf')
    assert result.exit_code == 2, output
    assert f"not UTF-8 text at byte offset {offset} (line 2" in output
    assert "Traceback" not in output and not (tmp_path / "runs").exists()


def test_a_binary_label_that_is_not_binary_is_named(data, tmp_path):
    result, output = invoke("analyze", "--hf", data["gpt2"] / "checkpoint-*", "--probe",
                            data["probe"], "--tokenizer", data["tokenizer"], "--label", "role",
                            "--runs", tmp_path / "runs", "--quiet", "--basis", "random",
                            "--set", "decompose.lca=false",
                            "--set", "cluster.trajectories=['loss']")
    assert result.exit_code == 2, output  # role has three values: first, sep, copy
    assert "error: evaluate.labels: column 'role'" in output and "not binary" in output
    assert not (tmp_path / "runs").exists()  # checked before anything is computed


def test_a_duplicated_checkpoint_is_flagged_and_recorded_when_the_run_is_made(data, tmp_path):
    import shutil

    series = tmp_path / "series"
    for step in STEPS:
        shutil.copytree(data["gpt2"] / f"checkpoint-{step}", series / f"checkpoint-{step}")
    shutil.copytree(data["gpt2"] / "checkpoint-10", series / "checkpoint-15")  # a repeat
    run = polca.Run.from_hf(str(series / "checkpoint-*"), data["probe"], name="dup",
                            runs=tmp_path, tokenizer=data["tokenizer"])
    with pytest.warns(UserWarning, match=r"identical weights at steps \[\(10, 15\)\]"):
        assert run.ctx.run.exists()  # opening creates the run
    source = json.loads((run.root / "source.json").read_text())
    assert source["duplicates"] == [[10, 15]]
    # the series' weight fingerprints are the run's checkpoint identity: no file is re-hashed
    run.progress = False
    run.trajectories()
    recorded = json.loads((run.root / ".progress" / "inputs" / "trajectories.json").read_text())
    fingerprints = [c["fingerprint"] for c in source["checkpoints"]]
    assert recorded["checkpoints"] == sha256_json([[0, 10, 15, 20, 30], fingerprints])
    assert not (run.root / ".progress" / "file-hashes.json").exists()
