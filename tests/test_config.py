import pytest

from sleepbot import config
from sleepbot.config import RunConfig, parse_overrides, resolve_run_config
from sleepbot.errors import ConfigError


def test_names_match_registries():
    from sleepbot.data import LOADERS
    from sleepbot.models import ARCHS

    assert set(config.DATASETS) == set(LOADERS)
    assert set(config.ARCHS) == set(ARCHS)


def test_overrides_and_yaml_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nmodel:\n  arch: lenet5\n  lr: 1e-3\n")
    cfg = resolve_run_config(
        path, ["--model.lr", "0.02", "--trainer.max_steps=7", "--sleep.options.alpha", "0.1"]
    )
    assert isinstance(cfg, RunConfig)
    assert (cfg.seed, cfg.model.arch, cfg.model.lr, cfg.trainer.max_steps) == (3, "lenet5", 0.02, 7)
    assert cfg.sleep.options == {"alpha": 0.1}
    # YAML 1.1 reads 1e-3 as a string: it must still become a float
    assert resolve_run_config(path).model.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["--model.arch", "resnet9000"], "unknown model.arch 'resnet9000'; valid: small_cnn"),
        (["--data.name", "imagenet"], "unknown data.name 'imagenet'; valid: digits, mnist1d"),
        (["--model.optimizer", "lion"], "unknown model.optimizer 'lion'; valid: sgd, momentum, adam, adamw"),
        (["--model.nope", "1"], "unknown config key 'model.nope'; valid keys:"),
        (["--trainer.max_steps", "many"], "config key 'trainer.max_steps' must be int, got 'many'"),
        (["--model", "3"], "config key 'model' must be a mapping"),
        (["--seed"], "override '--seed' needs a value"),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_bad_overrides_are_one_line_errors(tokens, message):
    with pytest.raises(ConfigError) as err:
        resolve_run_config(None, tokens)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve_run_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_run_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        resolve_run_config(scalar)


def test_parse_overrides_types():
    tree = parse_overrides(["--a.b", "true", "--a.c", "null", "--d", "[1, 2]"])
    assert tree == {"a": {"b": True, "c": None}, "d": [1, 2]}
