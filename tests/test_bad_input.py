"""Bad input: one `error:` line naming the problem and the fix, exit code 2, no traceback unless
`--debug`, nothing written. One test per row of docs/reliability.md.

Most rows call `dtvg_ds.cli.run_entry(train, argv)` in-process: these errors are raised before
the process group exists (engine.setup checks everything it can first), so no launcher is needed
and the test proves the real entry point's behaviour (exit code, stderr, no output dir). Three
real 2-rank launcher runs prove the same end to end, including an error raised after the process
group started (a non-empty output dir; an artifact whose P_init differs, found only once the
backbone is loaded) and that the launcher passes exit code 2 through.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from dtvg_ds.artifacts import save_artifact
from dtvg_ds.cli import run_entry
from dtvg_ds.data.zoo import TaskError
from dtvg_ds.engine import train
from tests.conftest import ROOT, build_tiny_t5, launch, train_args

TRAIN = ROOT / "launchers" / "train.py"
ZERO3 = str(ROOT / "ds_configs" / "zero3.json")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    """CPU accelerator, no launcher variables, and the SIGTERM handler train() installs undone."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def tpvs(tiny_model, tmp_path_factory):
    from tests.conftest import make_tpvs

    return make_tpvs(tiny_model, tmp_path_factory.mktemp("tpvs"))[0]


def _argv(model, tmp_path, **kw):
    kw.setdefault("deepspeed", ZERO3)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return train_args(model, tmp_path / "out", **kw)


def _expect_error(argv, tmp_path, capsys, *needles):
    """Exit 2, exactly one error line containing `needles`, no traceback, nothing written."""
    code = run_entry(train, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    return lines[0]


def _local_data(root, train_rows, valid_rows, fmt="jsonl"):
    d = root / "data"
    d.mkdir()
    for name, rows in (("train", train_rows), ("validation", valid_rows)):
        if fmt == "csv":
            (d / f"{name}.csv").write_text("".join(f"{r['source']},{r['target']}\n" for r in rows))
        else:
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


ROWS = [{"source": f"text {i}", "target": "yes" if i % 2 else "no"} for i in range(10)]


# --- DeepSpeed JSON ----------------------------------------------------------------------------

def test_malformed_deepspeed_json(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    _expect_error(_argv(tiny_model, tmp_path, deepspeed=str(bad)), tmp_path, capsys,
                  "malformed JSON at line 1")


def test_deepspeed_json_value_of_the_wrong_type(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": "adamw", "zero_optimization": {"stage": 3}}')
    _expect_error(_argv(tiny_model, tmp_path, deepspeed=str(bad)), tmp_path, capsys,
                  "wrong type or shape", "fix the JSON")


def test_deepspeed_json_contradicting_a_flag(tiny_model, tmp_path, capsys):
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    _expect_error(_argv(tiny_model, tmp_path, deepspeed=str(f)), tmp_path, capsys,
                  "train_micro_batch_size_per_gpu = 16 contradicts --per_device_train_batch_size 4",
                  'set the JSON value to "auto" or drop the flag')


def test_missing_deepspeed_json(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path, deepspeed=str(tmp_path / "nope.json")), tmp_path,
                  capsys, "no such file")


def test_batch_size_not_divisible_by_world_size(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a 2-rank launcher announces it
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["train_batch_size"] = 9
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    _expect_error(_argv(tiny_model, tmp_path, deepspeed=str(f)), tmp_path, capsys,
                  "train_batch_size = 9 does not divide by the world size 2", "auto")


# --- flags -------------------------------------------------------------------------------------

def test_unknown_task(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path, task="no_such_task"), tmp_path, capsys,
                  "unknown task 'no_such_task'", "--data_dir")


def test_unknown_method(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path, method="lora"), tmp_path, capsys,
                  "--method 'lora' is unknown; choose one of")


def test_unknown_flag(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path) + ["--lr", "0.1"], tmp_path, capsys,
                  "unrecognized arguments: --lr", "--help")


def test_contradictory_flags(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path, resume="auto") + ["--overwrite_output_dir"],
                  tmp_path, capsys, "--resume and --overwrite_output_dir contradict each other")


def test_unsupported_quantization_zero_combination(tiny_model, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path) + ["--load_in_8bit"], tmp_path, capsys,
                  "--load_in_8bit with ZeRO-3", "use --deepspeed ds_configs/zero2_8bit.json")
    _expect_error(_argv(tiny_model, tmp_path) + ["--load_in_4bit", "--bf16",
                                                 "--bnb_4bit_quant_storage", "uint8"],
                  tmp_path, capsys, "--bnb_4bit_quant_storage uint8 with a bfloat16 model",
                  "set --bnb_4bit_quant_storage bfloat16")


# --- backbone ----------------------------------------------------------------------------------

def test_model_path_that_does_not_exist(tmp_path, capsys):
    _expect_error(_argv(tmp_path / "no_model", tmp_path), tmp_path, capsys,
                  "no_model: no such directory", "pass a local model dir")


def test_model_dir_without_a_config(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    _expect_error(_argv(tmp_path / "empty_model", tmp_path), tmp_path, capsys,
                  "could not load its config")


# --- prompt artifacts --------------------------------------------------------------------------

def _copy_artifact(src, dst, prompt=None, init=None, **meta):
    from dtvg_ds.artifacts import load_artifact

    a = load_artifact(src)
    m = {**a.meta, **meta}
    save_artifact(dst, a.prompt if prompt is None else prompt, a.init if init is None else init,
                  m)
    return dst


def test_artifact_from_another_backbone(tiny_model, tpvs, tmp_path, capsys):
    other = _copy_artifact(tpvs["src_a"], tmp_path / "other_bb", backbone="t5-large",
                           backbone_fingerprint="0123456789abcdef")
    _expect_error(_argv(tiny_model, tmp_path, method="spot", source_tpvs=[str(other)]), tmp_path,
                  capsys, "trained on backbone 't5-large'", "pass the --model_name_or_path it was trained on")


def test_artifact_from_another_init(tiny_model, tpvs, tmp_path, capsys):
    other = _copy_artifact(tpvs["src_a"], tmp_path / "other_init", prompt=torch.ones(8, 64),
                           init=torch.zeros(8, 64), task="other")
    _expect_error(_argv(tiny_model, tmp_path, method="dtvg", target_tpv=str(tpvs["target_t"]),
                        source_tpvs=[str(tpvs["src_a"]), str(other)]), tmp_path, capsys,
                  "prompt init differs", "--prompt_init/--prompt_init_seed")


def test_artifact_of_another_size(tiny_model, tpvs, tmp_path, capsys):
    other = _copy_artifact(tpvs["src_a"], tmp_path / "r4", prompt=torch.ones(4, 64),
                           init=torch.zeros(4, 64), task="short")
    _expect_error(_argv(tiny_model, tmp_path, method="dtvg", target_tpv=str(tpvs["target_t"]),
                        source_tpvs=[str(other)]), tmp_path, capsys,
                  "prompt length r differs", "num_tokens 4 vs 8")


def test_prompt_length_flag_contradicting_the_artifact(tiny_model, tpvs, tmp_path, capsys):
    _expect_error(_argv(tiny_model, tmp_path, method="dtvg", target_tpv=str(tpvs["target_t"]),
                        source_tpvs=[str(tpvs["src_a"])], num_virtual_tokens=5), tmp_path, capsys,
                  "--num_virtual_tokens 5 differs", "drop the flag")


def test_nan_in_an_artifact(tiny_model, tpvs, tmp_path, capsys):
    p = torch.zeros(8, 64)
    p[3, 7] = float("inf")
    other = _copy_artifact(tpvs["src_a"], tmp_path / "inf", prompt=p, task="inf")
    _expect_error(_argv(tiny_model, tmp_path, method="spot", source_tpvs=[str(other)]), tmp_path,
                  capsys, "contains NaN/Inf", "re-train it")


def test_truncated_safetensors(tiny_model, tpvs, tmp_path, capsys):
    other = _copy_artifact(tpvs["src_a"], tmp_path / "torn")
    f = other / "prompt.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    _expect_error(_argv(tiny_model, tmp_path, method="spot", source_tpvs=[str(other)]), tmp_path,
                  capsys, "checksum does not match", "truncated or modified")
    meta = json.loads((other / "tpv.json").read_text())  # without the checksum: safetensors says
    meta.pop("safetensors_sha256")
    (other / "tpv.json").write_text(json.dumps(meta))
    _expect_error(_argv(tiny_model, tmp_path, method="spot", source_tpvs=[str(other)]), tmp_path,
                  capsys, "unreadable safetensors", "the file is corrupt")


# --- data --------------------------------------------------------------------------------------

def test_empty_dataset(tiny_model, tmp_path, capsys):
    d = _local_data(tmp_path, [], ROWS)
    _expect_error(_argv(tiny_model, tmp_path, task="mytask", data_dir=str(d)), tmp_path, capsys,
                  "task 'mytask', split 'train': no examples", "check --data_dir")


def test_empty_csv_file(tiny_model, tmp_path, capsys):
    d = _local_data(tmp_path, [], ROWS, fmt="csv")
    _expect_error(_argv(tiny_model, tmp_path, task="mytask", data_dir=str(d)), tmp_path, capsys,
                  "cannot read the train file", "fix or replace it")


def test_empty_split(tiny_model, tmp_path, capsys):
    d = _local_data(tmp_path, ROWS, [])
    _expect_error(_argv(tiny_model, tmp_path, task="mytask", data_dir=str(d)), tmp_path, capsys,
                  "split 'validation': no examples")


def test_few_shot_k_larger_than_the_data(tiny_model, tmp_path, capsys):
    d = _local_data(tmp_path, ROWS, ROWS)
    _expect_error(_argv(tiny_model, tmp_path, task="mytask", data_dir=str(d), k_shot=16),
                  tmp_path, capsys, "--k_shot 16 is larger than the 10 usable training examples",
                  "lower --k_shot")


# --- output directory --------------------------------------------------------------------------

def test_output_dir_blocked_by_a_file(tiny_model, tmp_path, capsys):
    """A file where a directory should be: fails even for root, unlike a chmod'ed dir."""
    (tmp_path / "blocker").write_text("not a dir")
    code = run_entry(train, _argv(tiny_model, tmp_path, output_dir=str(tmp_path / "blocker" / "o")))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "blocker is a file, not a directory" in lines[0] and "pass another --output_dir" in lines[0]
    assert (tmp_path / "blocker").read_text() == "not a dir"


PROBE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    from dtvg_ds.cli import run_entry
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    def never(cfg):
        raise SystemExit("the run started")
    sys.exit(run_entry(never, {argv!r}))
""")


def test_output_dir_that_refuses_writes(tmp_path):
    """The kernel refuses the start-up probe's write (RLIMIT_FSIZE -> EFBIG; as root, chmod would
    not stop it): exit 2 before the run starts, naming the directory and the fix."""
    out = tmp_path / "out"
    argv = ["--task", "senti_a", "--output_dir", str(out)]
    p = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), argv=argv)],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert f"--output_dir {out}: cannot write in {tmp_path} (EFBIG" in lines[0]
    assert "make it writable, free space, or pass another --output_dir" in lines[0]
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".")]


def test_debug_shows_the_traceback(tiny_model, tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        run_entry(train, _argv(tiny_model, tmp_path, task="no_such_task") + ["--debug"])


# --- end to end through the real launcher (2 ranks) --------------------------------------------

def _launch_expect_2(args, *needles):
    p = launch(TRAIN, args, check=False, timeout=600)
    lines = {ln for ln in p.stderr.splitlines() if ln.startswith("error:")}
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert len(lines) == 1, p.stderr[-4000:]  # each rank prints the same one line
    line = lines.pop()
    for n in needles:
        assert n in line, line
    assert "Traceback" not in p.stderr
    return line


@pytest.mark.dist
def test_launcher_bad_model_path_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    _launch_expect_2(train_args(tmp_path / "no_model", out), "no_model: no such directory")
    assert not out.exists()


@pytest.mark.dist
def test_launcher_non_empty_output_dir_exits_2_untouched(tiny_model, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    _launch_expect_2(train_args(tiny_model, out), "is not empty", "--resume auto",
                     "--overwrite_output_dir")
    assert sorted(x.name for x in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "mine"


@pytest.mark.dist
def test_launcher_artifact_with_another_p_init_found_after_loading(tiny_model, tmp_path):
    """Same architecture, other weights: only the loaded embedding shows the P_init differs.
    That is after the process group started and the output dir was created: the dir is removed
    again, so nothing is left."""
    from transformers import AutoModelForSeq2SeqLM

    from dtvg_ds.backbone import fingerprint as backbone_fingerprint
    from dtvg_ds.model import init_prompt

    other_model = build_tiny_t5(tmp_path / "other_model", seed=1)
    bb = AutoModelForSeq2SeqLM.from_pretrained(other_model)
    p_init = init_prompt(bb, 8, "vocab", 0)
    art = tmp_path / "src"
    save_artifact(art, p_init + 0.1, p_init, {
        "task": "src", "backbone": str(other_model), "backbone_fingerprint":
        backbone_fingerprint(bb.config), "init_method": "vocab", "init_seed": 0, "steps": 1,
        "method": "pt", "best_metric": {"name": "accuracy", "value": 50.0, "step": 1}})
    out = tmp_path / "out"
    _launch_expect_2(train_args(tiny_model, out, method="spot", source_tpvs=[str(art)],
                                cache_dir=str(tmp_path / "cache")),
                     "its P_init differs from this run's", "--prompt_init_seed stage 1 used")
    assert not out.exists()
