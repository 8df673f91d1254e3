"""Config: dataclass -> CLI (+ YAML), validation that collects every problem, and the
reconciliation of shared settings with the DeepSpeed JSON."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from dtvg_ds.config import ConfigError, parse_config, read_ds_config, resolve_ds_config
from dtvg_ds.methods import validate as validate_method
from tests.conftest import ROOT

BASE = ["--task", "senti_a", "--output_dir", "/tmp/x"]


def test_hf_trainer_flag_names_parse():
    cfg = parse_config(BASE + ["--learning_rate", "0.1", "--per_device_train_batch_size", "4",
                               "--gradient_accumulation_steps", "2", "--max_steps", "7",
                               "--eval_steps", "3", "--save_steps", "5", "--seed", "9",
                               "--bf16", "--max_source_length", "64"])
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
            cfg.max_steps, cfg.eval_steps, cfg.save_steps, cfg.seed, cfg.bf16,
            cfg.max_source_length) == (0.1, 4, 2, 7, 3, 5, 9, True, 64)
    assert "learning_rate" in cfg.explicit and "warmup_steps" not in cfg.explicit


def test_yaml_then_cli_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("task: senti_b\nlearning_rate: 0.05\nmax_steps: 11\n")
    cfg = parse_config(["--config", str(y), "--output_dir", "o", "--max_steps", "3"])
    assert (cfg.task, cfg.learning_rate, cfg.max_steps) == ("senti_b", 0.05, 3)


def test_yaml_unknown_key_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("task: a\nlearnin_rate: 1\n")
    with pytest.raises(ConfigError, match="learnin_rate"):
        parse_config(["--config", str(y), "--output_dir", "o"])


def test_validation_collects_all_problems():
    with pytest.raises(ConfigError) as e:
        # the entry points pass the method registry's check: its problems join the config's
        parse_config(["--method", "nope", "--max_steps", "0", "--fp16", "--learning_rate", "-1"],
                     checks=[validate_method])
    msg = str(e.value)
    for needle in ("--method 'nope'", "--task is required", "--output_dir is required",
                   "--max_steps must be >= 1", "--fp16", "--learning_rate must be > 0"):
        assert needle in msg
    assert len(e.value.problems) >= 6


def test_dtvg_extension_flags_are_validated():
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + ["--merge_norm", "sources", "--source_scale_init", "0"])
    msg = str(e.value)
    assert "--merge_norm 'sources': choose none or target" in msg
    assert "--source_scale_init must be a finite number > 0 (got 0.0)" in msg
    cfg = parse_config(BASE + ["--merge_norm", "target", "--source_scale_init", "0.25",
                               "--eval_on_start"])
    assert (cfg.merge_norm, cfg.source_scale_init, cfg.eval_on_start) == ("target", 0.25, True)


def test_unknown_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="unrecognized arguments: --lr"):
        parse_config(BASE + ["--lr", "0.1"])


def _ds():
    return read_ds_config(str(ROOT / "ds_configs" / "zero3.json"))


def test_auto_values_are_filled_from_the_config():
    cfg = parse_config(BASE + ["--per_device_train_batch_size", "4",
                               "--gradient_accumulation_steps", "3", "--bf16"])
    ds, adopted = resolve_ds_config(cfg, _ds(), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == cfg.learning_rate
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["gradient_clipping"] == 1.0
    assert adopted == {}


def test_concrete_json_value_is_adopted_when_flag_not_given():
    ds = _ds()
    ds["train_micro_batch_size_per_gpu"] = 16
    cfg = parse_config(BASE)
    out, adopted = resolve_ds_config(cfg, ds, world_size=1)
    assert adopted == {"per_device_train_batch_size": 16}
    assert out["train_batch_size"] == 16  # the adopted micro batch feeds the later checks
    assert cfg.per_device_train_batch_size == 8  # the config itself is never edited (frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.per_device_train_batch_size = 16


def test_conflict_names_both_settings():
    ds = _ds()
    ds["train_micro_batch_size_per_gpu"] = 16
    ds["optimizer"]["params"]["lr"] = 0.01
    cfg = parse_config(BASE + ["--per_device_train_batch_size", "4", "--learning_rate", "0.3"])
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, ds, world_size=1, path="my.json")
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu = 16" in msg and "--per_device_train_batch_size" in msg
    assert "optimizer.params.lr = 0.01" in msg and "--learning_rate" in msg


def test_train_batch_size_must_divide():
    ds = _ds()
    ds["train_batch_size"] = 10
    cfg = parse_config(BASE + ["--per_device_train_batch_size", "4"])
    with pytest.raises(ConfigError, match="train_batch_size = 10"):
        resolve_ds_config(cfg, ds, world_size=2)


def test_fp16_json_refused():
    ds = _ds()
    ds["fp16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config(parse_config(BASE), ds, world_size=1)


def test_malformed_json_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match="malformed JSON at line 1"):
        read_ds_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        read_ds_config(str(tmp_path / "missing.json"))


def test_shipped_configs_resolve():
    for name in ("zero2.json", "zero3.json"):
        ds = read_ds_config(str(ROOT / "ds_configs" / name))
        out, _ = resolve_ds_config(parse_config(BASE), ds, world_size=8)
        assert json.dumps(out).count('"auto"') <= 1  # only the persistence threshold (engine)


def test_launcher_without_launcher_explains(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py")] + BASE,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                            "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2
    assert "deepspeed --num_gpus" in p.stderr and "torchrun" in p.stderr


def test_help_works_without_launcher():
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--help"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "--per_device_train_batch_size" in p.stdout
    text = " ".join(p.stdout.split())
    assert "exit codes: 0 = done" in text and "3 = stopped by SIGTERM/SIGUSR1" in text


def test_misspelt_zero_key_is_named_before_launch():
    ds = _ds()
    ds["zero_optimization"]["stage3_param_persistance_threshold"] = 10
    with pytest.raises(ConfigError, match="zero_optimization.stage3_param_persistance_threshold: "
                                          "Extra inputs are not permitted"):
        resolve_ds_config(parse_config(BASE), ds, world_size=2)


def test_hf_trainer_scheduler_and_run_flags():
    cfg = parse_config(BASE + ["--resume_from_checkpoint", "auto", "--lr_scheduler_type", "cosine",
                               "--warmup_ratio", "0.1", "--max_steps", "95", "--run_name", "r1",
                               "--ddp_timeout", "600", "--disable_tqdm"])
    assert cfg.resume == "auto" and cfg.lr_scheduler_type == "cosine"
    assert (cfg.run_name, cfg.ddp_timeout, cfg.disable_tqdm) == ("r1", 600, True)
    from dtvg_ds.config import warmup_steps

    assert warmup_steps(cfg) == 10  # ceil(0.1 x 95); --warmup_steps > 0 would win
    assert warmup_steps(parse_config(BASE + ["--warmup_ratio", "0.1", "--warmup_steps", "3"])) == 3
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + ["--lr_scheduler_type", "poly", "--warmup_ratio", "1.5"])
    assert "--lr_scheduler_type 'poly': choose one of linear, cosine" in str(e.value)
    assert "--warmup_ratio must be in [0, 1)" in str(e.value)


def _warmup_decay_json() -> dict:
    ds = _ds()
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
        "total_num_steps": "auto"}}
    return ds


def test_warmup_decay_json_gives_the_same_curve_as_get_scheduler():
    """A WarmupDecayLR block is filled with a linear warmup (DeepSpeed's default is log) and
    run as `get_scheduler("linear")` (DeepSpeed's own lags HF's by one step): both scheduler
    paths give HF Trainer's curve. A log-warmup block stays DeepSpeed's."""
    import torch
    from transformers import get_scheduler

    from dtvg_ds.engine import configure_schedule

    cfg = parse_config(BASE + ["--max_steps", "20", "--warmup_ratio", "0.25"])
    ds, _ = resolve_ds_config(cfg, _warmup_decay_json(), world_size=1)
    sp = ds["scheduler"]["params"]
    assert sp["warmup_type"] == "linear" and sp["warmup_num_steps"] == 5
    assert sp["total_num_steps"] == 20

    def curve(make) -> list[float]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
        sch, lrs = make(opt), []
        for _ in range(cfg.max_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return lrs

    groups = [{"params": [], "lr": cfg.learning_rate}]
    from_json = configure_schedule(ds, groups, cfg)
    assert "scheduler" not in ds  # run by us, not by DeepSpeed
    no_json = configure_schedule(_ds(), groups, cfg)
    hf = curve(lambda o: get_scheduler("linear", o, num_warmup_steps=5, num_training_steps=20))
    assert curve(from_json) == pytest.approx(hf, abs=1e-12) == curve(no_json)
    assert hf[0] == 0.0 and hf[5] == pytest.approx(cfg.learning_rate) and hf[-1] > 0
    log = _warmup_decay_json()
    log["scheduler"]["params"]["warmup_type"] = "log"
    ds_log, _ = resolve_ds_config(cfg, log, world_size=1)
    assert configure_schedule(ds_log, groups, cfg) is None and "scheduler" in ds_log
    assert ds_log["scheduler"]["params"]["warmup_max_lr"] == [cfg.learning_rate]
    # a non-linear schedule cannot come from that block
    with pytest.raises(ConfigError, match="decays linearly, --lr_scheduler_type is 'cosine'"):
        cosine = parse_config(BASE + ["--lr_scheduler_type", "cosine"])
        resolve_ds_config(cosine, _warmup_decay_json(), world_size=1)


def test_shipped_deepspeed_config_by_name():
    assert read_ds_config("zero3") == read_ds_config(str(ROOT / "ds_configs" / "zero3.json"))
    with pytest.raises(ConfigError, match="a shipped config by name .*zero2, zero2_8bit, zero3"):
        read_ds_config("zero4")


def test_booleans_take_no_prefix():
    cfg = parse_config(BASE + ["--no_tokenized_cache", "--bf16", "--no_bf16"])
    assert cfg.tokenized_cache is False and cfg.bf16 is False
    assert "tokenized_cache" in cfg.explicit


def test_python_logging_levels(capsys):
    import logging

    from dtvg_ds import logs

    logs.configure_logging("warning")
    logs.info("quiet")
    logs.LOGGER.warning("loud")
    out = capsys.readouterr().out
    assert "quiet" not in out and "[dtvg_ds] loud" in out
    logs.configure_logging("info")
    logs.info("hello")
    assert capsys.readouterr().out == "[dtvg_ds] hello\n"
    assert logs.LOGGER.level == logging.INFO
    with pytest.raises(ConfigError, match="--log_level 'chatty'"):
        parse_config(BASE + ["--log_level", "chatty"])


def test_metric_for_best_model_selects_and_reports():
    from types import SimpleNamespace

    from dtvg_ds.data.zoo import get_task
    from dtvg_ds.engine import Best, _best_value, _selection

    res = {"score": 80.0, "accuracy": 80.0, "f1": 70.0, "average": 75.0}
    run = SimpleNamespace(cfg=parse_config(BASE), task=get_task("senti_a"))
    assert _selection(run, res) == 80.0
    assert _best_value(run, Best(80.0, 3, res)) == ("accuracy", 80.0)
    run.cfg = parse_config(BASE + ["--metric_for_best_model", "eval_f1"])
    assert _selection(run, res) == 70.0
    assert _best_value(run, Best(70.0, 3, res)) == ("f1", 70.0)
    run.cfg = parse_config(BASE + ["--metric_for_best_model", "f1", "--no_greater_is_better"])
    assert _selection(run, res) == -70.0  # lower is better: the larger key wins
    run.cfg = parse_config(BASE + ["--metric_for_best_model", "bleu"])
    with pytest.raises(ConfigError, match="reports accuracy, average, f1, score; pick one"):
        _selection(run, res)
