"""Shared fixtures: a tiny T5 saved with save_pretrained (loaded back through the real path),
and a helper that launches real multi-process DeepSpeed runs on the CPU accelerator."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_t5(out: Path, d_model: int = 64, seed: int = 0) -> Path:
    """A random tiny T5 + the demo word-level tokenizer, saved like a Hub checkpoint."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dtvg_ds.data.demo import VOCAB_SIZE, build_tokenizer

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB_SIZE, d_model=d_model, d_ff=2 * d_model, num_layers=2,
                   num_decoder_layers=2, num_heads=4, d_kv=d_model // 4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5") / "model")


HUB_REPO = "dtvg-test/tiny-t5"  # a Hub id that exists only in the `hf_home` cache below
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def hf_home(tiny_model, tmp_path_factory) -> Path:
    """An HF_HOME whose Hub cache holds `HUB_REPO` at `main`, in huggingface_hub's cache layout
    (what `python -m dtvg_ds.fetch` leaves on a shared disk); use with HF_HUB_OFFLINE=1."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + HUB_REPO.replace("/", "--"))
    shutil.copytree(tiny_model, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return home


def ds_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # DTVG_TEST_ACCELERATOR=cuda runs the dist tier on GPUs (2 ranks need 2 GPUs: NCCL refuses
    # two ranks on one device); the default is DeepSpeed's CPU accelerator with gloo.
    env.update({"DS_ACCELERATOR": os.environ.get("DTVG_TEST_ACCELERATOR", "cpu"),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                # one JIT cache per venv: two venvs sharing ~/.cache would rebuild the
                # deepspeed_shm_comm op on every alternation
                "TORCH_EXTENSIONS_DIR": os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions"))})
    env.update(extra)
    return env


def launch(script: str | Path, args: list[str], nproc: int = 2, launcher: str = "deepspeed",
           timeout: int = 600, check: bool = True, env: dict | None = None,
           ) -> subprocess.CompletedProcess:
    """Run `script args` on `nproc` CPU ranks with a real launcher; output captured."""
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
               str(script), *args]
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port,
               str(script), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env or ds_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"launch failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-6000:]}")
    return p


def train_args(model: Path, out: Path, task: str = "senti_a", **kw) -> list[str]:
    """A short stage-1 command line on the tiny model."""
    base = {"method": "pt", "task": task, "model_name_or_path": str(model),
            "output_dir": str(out), "num_virtual_tokens": 8, "max_steps": 12,
            "per_device_train_batch_size": 4, "learning_rate": 0.3, "eval_steps": 0,
            "save_steps": 0, "logging_steps": 1, "max_eval_samples": 32,
            "max_train_samples": 256, "report_to": "none"}
    base.update(kw)
    out_args: list[str] = []
    for k, v in base.items():
        out_args += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out_args


def assert_first_step_matches(backbone, model_dir: Path, facts: list[dict]) -> None:
    """Rebuild the probe's first step in one process (PT, r = 8, the same vocab init) on
    `backbone`, and check every rank's loss and the averaged prompt gradient against it.

    DeepSpeed averages the per-rank mean losses' gradients: the reference does exactly that.
    """
    import torch
    from transformers import AutoTokenizer

    from dtvg_ds.data import batches
    from dtvg_ds.data.zoo import get_task
    from dtvg_ds.methods.base import Optim
    from dtvg_ds.methods.pt import PromptTuning
    from dtvg_ds.model import PromptedSeq2Seq, init_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PromptedSeq2Seq(PromptTuning(init_prompt(backbone, 8, "vocab", 0), Optim(0.3)), backbone)
    enc = batches.encode(get_task("senti_a").load("train", limit=256), tok, 256, 16)
    losses = [model(**batches.collate(enc, f["indices0"], tok.pad_token_id)) for f in facts]
    for f, loss in zip(facts, losses, strict=True):
        assert f["loss0"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-5)
    (sum(losses) / len(losses)).backward()
    ref = model.prompter.prompt.grad
    assert ref.abs().sum() > 0
    for f in facts:
        got = torch.tensor(f["grad0"])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _release_deepspeed_shm():
    """DeepSpeed's CPU shm all-reduce leaves a /dev/shm segment per rank and run (~64 MB each,
    never unlinked, not even on a clean exit); dozens of launches would fill RAM. Remove the
    ones this test session created."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for f in set(shm.glob("deepspeed_*")) - before:
            f.unlink(missing_ok=True)


def p_init_of(model_dir):
    """(P_init of r = 8 on the tiny model, its backbone fingerprint), as training computes them."""
    from transformers import AutoModelForSeq2SeqLM

    from dtvg_ds.backbone import fingerprint as backbone_fingerprint
    from dtvg_ds.model import init_prompt

    bb = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    return init_prompt(bb, 8, "vocab", 0), backbone_fingerprint(bb.config)


def make_tpvs(model_dir, root):
    """Stage-1 artifacts with a known right group, shared by the DTVG/SPoT/report/SLURM tests.
    Target along +v; a, b along +v (a more); c along -v; d mostly -v plus noise."""
    from dtvg_ds.artifacts import save_artifact

    p_init, fp = p_init_of(model_dir)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    rows = torch.ones(8, 1)
    vectors = {"target_t": 0.10 * rows * v, "src_a": 0.09 * rows * v, "src_b": 0.05 * rows * v,
               "src_c": -0.10 * rows * v,
               "src_d": -0.05 * rows * v + 0.02 * torch.randn(8, 64, generator=g)}
    paths = {}
    for name, vec in vectors.items():
        paths[name] = root / name
        save_artifact(paths[name], p_init + vec, p_init, {
            "task": name, "backbone": str(model_dir), "backbone_fingerprint": fp,
            "init_method": "vocab", "init_seed": 0, "steps": 1, "method": "pt",
            "best_metric": {"name": "accuracy", "value": 50.0, "step": 1}})
    return paths, vectors
