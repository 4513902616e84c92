"""Config files, overrides, validation messages, and the CLI."""

import dataclasses
import re
import typing
import subprocess
import sys

import pytest
import yaml

from npo_engine.config import ConfigError, TrainConfig, dump_config, field_docs, load_config


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(TrainConfig()))
    assert load_config(path) == TrainConfig()


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  clip_high: 0.28\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["run.steps=9", "data.levels=[2,3]", "algo.dual_clip=3"])
    assert cfg.algo.clip_high == 0.28 and cfg.run.steps == 9
    assert cfg.data.levels == (2, 3) and cfg.algo.dual_clip == 3.0


@pytest.mark.parametrize("override, message", [
    ("algo.clip_hgh=0.3", "did you mean algo.clip_high"),
    ("algoo.clip_high=0.3", "did you mean algo"),
    ("rollout.group_size=1", "rollout.group_size = 1 is invalid"),
    ("optim.lr=-1", "optim.lr = -1.0 is invalid"),
    ("algo.loss_agg=mean", "choose one of 'token-mean'"),
    ("algo.dual_clip=0.5", "constant > 1"),
    ("logging.progress=maybe", "use true or false"),
    ("run.steps=1.5", "use an integer"),
    ("algo=3", "algo"),
    ("novalue", "section.key=value"),
    ("kernels.logits_cache_mb=-5", "kernels.logits_cache_mb = -5.0 is invalid"),
])
def test_bad_values_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'steps'"):
        cfg.run.steps = 3


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert files, "configs/ should ship ready configs"
    for path in files:
        load_config(path)


def _npo(*args):
    return subprocess.run([sys.executable, "-m", "npo_engine.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_print_config_applies_overrides():
    result = _npo("train", "--print-config", "algo.clip_high=0.28", "run.steps=3")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["algo"]["clip_high"] == 0.28 and printed["run"]["steps"] == 3


def test_cli_help_lists_fields_with_docstrings():
    for args in (["--help"], ["train", "--help"]):
        result = _npo(*args)
        assert result.returncode == 0
        assert "algo.clip_high" in result.stdout and "DAPO's clip-higher" in result.stdout


def test_cli_reports_config_errors_without_traceback():
    result = _npo("train", "algo.clip_hig=0.3")
    assert result.returncode == 2
    assert "did you mean algo.clip_high" in result.stderr and "Traceback" not in result.stderr


def test_npo_checks_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"mix.gate = 1.5 is invalid: .* \[0, 1\]"):
        load_config(None, ["mix.gate=1.5"])
    with pytest.raises(ConfigError, match=r"npo.early_steps = 20 is invalid: the early window must end before "
                                          r"run.steps = 10"):
        load_config(None, ["mix.mode=npo", "run.steps=10"])
    with pytest.raises(ConfigError, match=r"npo.late_start = 90 is invalid: late_start \+ late_steps = 160 passes"):
        load_config(None, ["mix.mode=npo", "run.steps=100", "npo.late_start=90"])
    with pytest.raises(ConfigError, match="needs an intervention"):
        load_config(None, ["mix.mode=npo", "npo.early=false"])
    with pytest.raises(ConfigError, match="choose one of 'exact', 'none', 'decoupled', 'luffy', 'exgrpo'"):
        load_config(None, ["mix.guide_is=ppo"])
    with pytest.raises(ConfigError, match=r"mix.guide_is = 'exact' is invalid: mix.mode = luffy weights its extra "
                                          r"trajectories with one of \['luffy', 'none'\]"):
        load_config(None, ["mix.mode=luffy", "mix.guide_is=exact"])
    with pytest.raises(ConfigError, match=r"rlep.converged_run = None is invalid: .* give its run directory"):
        load_config(None, ["mix.mode=rlep"])
    with pytest.raises(ConfigError, match=r"rlep.replay = 8 is invalid: replayed slots must leave fresh ones"):
        load_config(None, ["mix.mode=rlep", "rlep.converged_run=runs/demo", "rlep.replay=8"])
    with pytest.raises(ConfigError, match=r"algo.dual_clip = 3.0 is invalid: .*clip_on_policy = false removes"):
        load_config(None, ["algo.clip_on_policy=false", "algo.dual_clip=3"])
    # Each mode's own guide weighting when mix.guide_is is unset.
    assert [load_config(None, [f"mix.mode={mode}", "rlep.converged_run=r"]).mix.guide_weighting
            for mode in ("npo", "luffy", "exgrpo", "rlep")] == ["exact", "luffy", "exgrpo", "none"]
    assert load_config(None, ["npo.late_start=90"]).mix.mode == "none"  # unused sections are not cross-checked


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr = inf is invalid: use a finite number"),
    ("rollout.temperature=.inf", "rollout.temperature = inf is invalid: use a finite number"),
    ("reward.timeout_s=.inf", "reward.timeout_s = inf is invalid: use a finite number"),
    ("optim.betas=[0.9, .nan]", "optim.betas = (0.9, nan) is invalid"),
    ("optim.eps=-1", "optim.eps = -1.0 is invalid: use a small positive value"),
    ("optim.max_bad_steps=0", "optim.max_bad_steps = 0 is invalid"),
    ("reward.clip_range=[1, -1]", "reward.clip_range = (1.0, -1.0) is invalid: give [low, high] with low < high"),
    ("reward.step_timeout_s=1", "reward.step_timeout_s = 1.0 is invalid: use a budget of at least"),
    ("data.prompt_template=Q: {prompt} \\boxed{}", "only {prompt} is substituted, so write every other brace "
                                                   "doubled"),
    ("data.prompt_template={{prompt}}", "the template must contain {prompt}"),
])
def test_values_that_would_fail_later_are_refused_now(override, message):
    """Each of these once passed the check and failed at the first step or evaluation (or wrote inf into the
    weights); literal braces in a template are fine when doubled."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    assert load_config(None, ["data.prompt_template=Q: {prompt} \\boxed{{}}"]).data.prompt_template.endswith("{{}}")


def test_empty_or_scalar_yaml_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  # temperature: 0.7\nrun:\n  steps: 3\n")
    cfg = load_config(path)  # a section whose keys are all commented out keeps its defaults
    assert cfg.rollout == TrainConfig().rollout and cfg.run.steps == 3
    path.write_text("rollout: 5\n")
    with pytest.raises(ConfigError, match="rollout in .* must be a mapping of its fields"):
        load_config(path)


def test_checkpoint_defaults_save_periodically_with_retention():
    cfg = TrainConfig().checkpoint
    assert cfg.every == 50 and cfg.keep_last == 2
