"""Checkpoints: atomic directories with a manifest, verified on resume, torn ones skipped, pruning
that never deletes what a resume needs, and write failures (a full or read-only disk) that leave
the previous checkpoint intact.

Most tests drive `dtvg_ds.checkpoint` in-process with a stand-in engine that writes its files with
`torch.save` as DeepSpeed does (no process group: barriers are no-ops). The write failures are
real: the kernel refuses the writes (RLIMIT_FSIZE -> EFBIG, which works as root, where chmod
does not), in a child process and, at the end, in a real 2-rank DeepSpeed run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dtvg_ds import checkpoint as ck
from tests.conftest import ROOT, VENV_BIN, ds_env, free_port, launch, read_jsonl, train_args

TRAIN = ROOT / "launchers" / "train.py"


class FakeEngine:
    """Writes and reads checkpoint files like DeepSpeed's engine (torch.save per rank)."""

    def __init__(self, value: float = 0.0, size: int = 256):
        self.w = torch.full((size,), value)
        self.loaded: dict | None = None

    def save_checkpoint(self, save_dir, tag, exclude_frozen_parameters=False, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"prompt": self.w}}, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"exp_avg": self.w * 2}},
                   d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return True

    def load_checkpoint(self, load_dir, tag, **kw):
        d = Path(load_dir) / tag
        self.loaded = torch.load(d / "mp_rank_00_model_states.pt")  # our own file
        return str(d), {}


STATE = {"best_score": 1.0, "best_step": 1, "best_metrics": {}, "method_state": {}}


def _save(out, step, keep=5, value=None):
    return ck.save(FakeEngine(float(step if value is None else value)), out, step, dict(STATE),
                   {"prompt": torch.ones(2, 3) * step}, keep)


def _names(out):
    return sorted(p.name for p in ck.ckpt_root(out).iterdir())


def test_layout_manifest_and_marker(tmp_path):
    d = _save(tmp_path, 3)
    assert d.name == "step-00000003"
    assert _names(tmp_path) == ["latest", "step-00000003"]  # no temp dir left
    assert (ck.ckpt_root(tmp_path) / "latest").read_text() == "step-00000003"
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"best.safetensors", "mp_rank_00_model_states.pt",
                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                      "rng_rank0.safetensors", "rng_rank0.json"}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (d / rel).stat().st_size and len(entry["sha256"]) == 64
    state = ck.verify(d)
    assert state["step"] == 3 and state["world_size"] == 1 and state["best_score"] == 1.0


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated or modified"),
    ("flip", "does not match its sha256"),
    ("delete", "is missing"),
    ("marker", "incomplete"),
    ("state", "trainer_state.json was modified"),
    ("manifest", "manifest.json does not match"),
])
def test_verify_refuses_torn_or_modified(tmp_path, damage, reason):
    d = _save(tmp_path, 1)
    f = d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-10] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "delete":
        f.unlink()
    elif damage == "marker":
        (d / "trainer_state.json").unlink()
    elif damage == "state":
        s = json.loads((d / "trainer_state.json").read_text())
        s["step"] = 99
        (d / "trainer_state.json").write_text(json.dumps(s))
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["files"].pop("rng_rank0.json")
        (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ck.CheckpointError, match=reason):
        ck.verify(d)
    with pytest.raises(ck.CheckpointError, match="cannot resume from .*--resume auto"):
        ck.find_resume(tmp_path, str(d))


def test_resume_auto_skips_torn_and_modified_with_a_warning(tmp_path, capsys):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    d6 = _save(tmp_path, 6)
    (d6 / "trainer_state.json").unlink()                              # torn: no marker
    d4 = ck.ckpt_root(tmp_path) / "step-00000004"
    (d4 / "best.safetensors").write_bytes(b"garbage")                 # modified
    stale = ck.ckpt_root(tmp_path) / ".tmp-step-00000008"              # a crash mid-save
    stale.mkdir()
    (stale / "trainer_state.json").write_text("{}")
    got = ck.find_resume(tmp_path, "auto")
    assert got == ck.ckpt_root(tmp_path) / "step-00000002"
    err = capsys.readouterr().err
    assert "skipping" in err and "step-00000006: incomplete" in err
    assert "step-00000004: best.safetensors has 7 bytes" in err
    assert ck.find_resume(tmp_path / "fresh", "auto") is None       # nothing yet: a fresh start
    assert ck.find_resume(tmp_path, "") is None


def test_load_restores_and_the_resumed_checkpoint_is_never_pruned(tmp_path):
    _save(tmp_path, 1)
    eng = FakeEngine()
    d1 = ck.find_resume(tmp_path, "auto")
    state, best = ck.load(eng, d1)
    assert state["step"] == 1 and eng.loaded["module"]["prompt"][0] == 1.0
    torch.testing.assert_close(best["prompt"], torch.ones(2, 3))
    for step in (2, 3, 4):  # the engine passes the checkpoint it resumed from as `protect`
        ck.save(FakeEngine(float(step)), tmp_path, step, dict(STATE), {}, 1, protect=d1)
    assert _names(tmp_path) == ["latest", "step-00000001", "step-00000004"]
    _save(tmp_path, 5, keep=1)  # a run that did not resume protects nothing of the old ones
    assert _names(tmp_path) == ["latest", "step-00000005"]


def test_prune_keeps_the_last_k_and_the_newest_valid(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert _names(tmp_path) == ["latest", "step-00000003", "step-00000004"]
    # the newest two are damaged (say, modified by hand): the newest valid one survives pruning
    root = ck.ckpt_root(tmp_path)
    for s in ("step-00000003", "step-00000004"):
        (root / s / "rng_rank0.json").write_text("{}")
    _save(tmp_path, 2, keep=1)          # resumed from older state: re-saves step 2
    assert _names(tmp_path) == ["latest", "step-00000002", "step-00000004"]
    ck._prune(root, 1, set())           # nothing protected but "newest valid" = step 2
    assert "step-00000002" in _names(tmp_path)


def test_a_stale_step_dir_is_replaced_and_temp_dirs_are_cleaned(tmp_path):
    root = ck.ckpt_root(tmp_path)
    (root / "step-00000005").mkdir(parents=True)                     # torn, same step
    (root / "step-00000005" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (root / ".tmp-step-00000007").mkdir()                            # left by a crash
    d = _save(tmp_path, 5)
    ck.verify(d)
    assert _names(tmp_path) == ["latest", "step-00000005"]


FAIL_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from dtvg_ds import checkpoint as ck
    from test_checkpoint import FakeEngine, STATE
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    try:
        ck.save(FakeEngine(7.0, size={size}), {out!r}, 7, dict(STATE), None, 2)
    except ck.OutputWriteError as e:
        print("REFUSED", e)
        sys.exit(2)
    print("SAVED")
""")


def test_a_refused_write_leaves_the_previous_checkpoint_intact(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses the write with EFBIG, also for
    root) during torch.save: a one-line error naming the directory, no step dir, resumable."""
    _save(tmp_path, 5)
    script = FAIL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), limit=64 * 1024,
                                size=64 * 1024, out=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "REFUSED cannot write checkpoint step-00000007 in --output_dir" in p.stdout
    assert str(tmp_path) in p.stdout and "--resume auto" in p.stdout
    assert len(p.stdout.strip().splitlines()) == 1
    assert not (ck.ckpt_root(tmp_path) / "step-00000007").exists()
    assert ck.find_resume(tmp_path, "auto") == ck.ckpt_root(tmp_path) / "step-00000005"
    ck.verify(ck.ckpt_root(tmp_path) / "step-00000005")
    _save(tmp_path, 7)   # space is back: the next save succeeds and clears the partial dir
    assert _names(tmp_path) == ["latest", "step-00000005", "step-00000007"]


def test_write_error_classification():
    import errno

    assert ck.is_write_error(OSError(errno.ENOSPC, "No space left on device"))
    assert ck.is_write_error(OSError(errno.EROFS, "Read-only file system"))
    assert ck.is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                          "unexpected pos 576 vs 534"))
    assert not ck.is_write_error(OSError(errno.ENOENT, "No such file"))
    assert not ck.is_write_error(RuntimeError("Connection closed by peer"))


# ----------------------------------------------------------------------------------------------
# a real 2-rank run whose output disk refuses writes mid-run
# ----------------------------------------------------------------------------------------------

def _limited(limit_bytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))
    return pre


@pytest.mark.dist
def test_disk_refusing_writes_mid_run_exits_2_and_keeps_the_checkpoint(tiny_model, tmp_path):
    """Run 1 checkpoints step 2. Run 2 resumes under a 48 KB file-size limit: logs still fit,
    the step-4 checkpoint (a 300-token prompt: > 100 KB of optimizer state per rank) does not. Exit 2, one
    error line, step 2 intact and still the newest valid checkpoint; run 3 (limit gone) resumes
    from it and finishes."""
    out = tmp_path / "full"
    kw = dict(max_steps=6, save_steps=2, num_virtual_tokens=300, prompt_init="uniform",
              tokenized_cache="false", logging_steps=1)
    launch(TRAIN, train_args(tiny_model, out, stop_at_step=2, **kw))
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), *train_args(tiny_model, out, resume="auto", **kw)]
    p = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600,
                       preexec_fn=_limited(48 * 1024))
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert 1 <= len(errors) <= 2, p.stderr[-3000:]  # one line, from each rank that hit it
    for line in errors:
        assert "cannot write checkpoint step-00000004" in line and str(out) in line
        assert "--resume auto" in line
    assert "Traceback" not in p.stderr
    root = ck.ckpt_root(out)
    assert sorted(x.name for x in root.glob("step-*")) == ["step-00000002"]
    assert ck.verify(root / "step-00000002")["step"] == 2
    assert ck.newest_valid(out) == root / "step-00000002"
    launch(TRAIN, train_args(tiny_model, out, resume="auto", **kw))
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 6 and (out / "prompt.safetensors").is_file()
