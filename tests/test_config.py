"""Config loading: YAML + dotted overrides, strict types, one-line errors with exit code 2."""

import re
import subprocess
import sys

import pytest

from fastvae.config import Config, from_dict, load_config, parse_override, shipped_configs, to_dict
from fastvae.errors import UserError
from fastvae.train import main
from helpers import CONFIGS, ROOT


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "celeba", "imagefolder", "kl_autoencoder", "kl_f8",
                                  "kl_f8_16ch"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg


def test_mnist_defaults_are_the_lecture():
    cfg = load_config(CONFIGS / "mnist.yaml")
    assert cfg.model.name == "conv_vae" and cfg.model.latent_dim == 2
    assert cfg.optim.name == "adam" and cfg.optim.lr == 5e-4
    assert cfg.loss.beta == 1.0 and cfg.loss.kl_warmup_steps == 0


def test_overrides_nested_and_typed():
    cfg = load_config(CONFIGS / "mnist.yaml", ["optim.lr=1e-3", "train.epochs=3", "model.latent_dim=8",
                                               "train.compile=true", "optim.betas=[0.5, 0.9]",
                                               "out_dir=/tmp/x", "train.mixed_precision=null"])
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 3 and cfg.model.latent_dim == 8
    assert cfg.train.compile is True and cfg.optim.betas == [0.5, 0.9]
    assert cfg.out_dir == "/tmp/x" and cfg.train.mixed_precision is None


def test_int_is_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("train.epohcs=3", "unknown config key 'train.epohcs'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.epochs=three", "config key 'train.epochs': expected int, got 'three'"),
    ("train.epochs=2.5", "config key 'train.epochs': expected int, got 2.5"),
    ("train.compile=maybe", "config key 'train.compile': expected bool"),
    ("optim.lr=fast", "config key 'optim.lr': expected float"),
    ("optim.lr=-0.1", "config key 'optim.lr': expected a value > 0"),
    ("model.latent_dim=0", "config key 'model.latent_dim': expected a value > 0"),
    ("loss.recon=l1", "config key 'loss.recon': expected one of bce, mse"),
    ("train.ops=cuda", "config key 'train.ops': expected one of eager"),
    ("data=3", "config section 'data': expected a mapping"),
    ("train.epochs", "override 'train.epochs': expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        load_config(CONFIGS / "mnist.yaml", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=f"config file '{tmp_path / 'nope.yaml'}' not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=rf"config file '{bad}' line \d+: .*expected valid YAML"):
        load_config(bad)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent: 3\n")
    with pytest.raises(UserError, match="unknown config key 'model.latent'; expected one of: name, latent_dim"):
        load_config(bad)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=") == ("a", "")


def test_cli_error_is_one_line_and_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(CONFIGS / "mnist.yaml"), "train.epohcs=3", f"out_dir={tmp_path}/run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fastvae: error: unknown config key 'train.epohcs'; expected one of: epochs, max_steps, ")
    assert ", resume, " in err  # names every valid key of the section
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


def test_cli_missing_config_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastvae.train", "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"fastvae: error: config file '{tmp_path / 'x.yaml'}' not found; "
                     f"expected a YAML file such as configs/mnist.yaml or a shipped config: "
                     f"{', '.join(sorted(shipped_configs()))}"]
    assert {"mnist", "celeba", "kl_f8", "vq_l2_ema_fashion_mnist", "llamagen_vq_f16"} <= set(shipped_configs())


def test_yaml_12_booleans_keep_no_a_string(tmp_path):
    cfg = load_config(CONFIGS / "mnist.yaml", ["train.mixed_precision=no", "out_dir=off"])
    assert cfg.train.mixed_precision == "no" and cfg.out_dir == "off"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n  compile: true\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.train.compile is True
    with pytest.raises(UserError, match="config key 'train.compile': expected bool, got 'yes'"):
        load_config(None, ["train.compile=yes"])


@pytest.mark.parametrize("overrides, message", [
    (["loss.kl_cycle_steps=1"], "'loss.kl_cycle_steps': a 1-step cycle keeps beta at 0 for the whole run"),
    (["loss.objective=tcvae", "data.batch_size=1"], "'data.batch_size': loss.objective=tcvae estimates q(z) from"),
    (["loss.free_bits=1e30"], "'loss.free_bits': 1e+30 nats x 2 dimensions is more than an 8-bit image of this "
                              "size holds (4347 nats); expected at most 2174 per dimension"),
    (["loss.capacity=5000"], "'loss.capacity': 5000 nats is more than an 8-bit image of this size holds"),
])
def test_schedules_that_would_train_something_else_are_refused(overrides, message):
    """Valid numbers that cannot mean what the user wants: refused in one line (the rule is in --help)."""
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("mnist", overrides)


def test_the_nearest_good_schedules_are_accepted():
    load_config("mnist", ["loss.kl_cycle_steps=2"])
    load_config("mnist", ["loss.objective=tcvae", "data.batch_size=2"])
    load_config("mnist", ["loss.free_bits=2000"])
    load_config("mnist", ["loss.capacity=4000"])
