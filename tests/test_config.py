import dataclasses
from pathlib import Path

import pytest

from sleepbot import config
from sleepbot.config import RunConfig, parse_overrides, resolve_run_config
from sleepbot.errors import ConfigError

NINO = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nino_mlp.pt"


def test_static_names_match_the_live_registries():
    """sleepbot.registry reads the registry lines from the source; it must find exactly what importing fills."""
    import sleepbot.forecast  # noqa: F401  (fills the registries)
    import sleepbot.sleep  # noqa: F401
    from sleepbot import registry
    from sleepbot.data import LOADERS
    from sleepbot.forecast.base import FORECASTERS
    from sleepbot.models import ARCHS, OPTIMIZERS
    from sleepbot.sleep import STRATEGIES

    static = registry._static_names()
    for kind, live in (
        ("dataset", LOADERS),
        ("arch", ARCHS),
        ("optimizer", OPTIMIZERS),
        ("strategy", STRATEGIES),
        ("forecaster", FORECASTERS),
    ):
        # everything registered by the package's own modules, nothing more (tests and scripts register their own)
        ours = {k for k, v in live.items() if getattr(v, "__module__", "").startswith("sleepbot.")}
        assert set(static[kind]) == ours, kind


def test_sleep_config_is_the_sleep_signature():
    """Every YAML-able Sleep constructor parameter is a sleep config key, with the same default."""
    import dataclasses
    import inspect

    from sleepbot.sleep import Sleep

    fields = {f.name: f for f in dataclasses.fields(config.SleepConfig)}
    params = inspect.signature(Sleep.__init__).parameters
    for name, p in params.items():
        if name in ("self", "strategy", "options", "schedule", "loss_fn", "seed"):
            continue
        assert name in fields, name
        assert fields[name].default == p.default, name
    assert set(fields) <= set(params)  # `options` is the **options of Sleep(strategy, **options)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    """Each file in configs/ parses with the loader of its kind, and its sleep callbacks build."""
    from sleepbot.sleep import sleep_from_config

    if path.name.startswith("compare_"):
        from sleepbot.compare import check_arms, load_compare_config

        cfg = load_compare_config(path)
        root = Path(__file__).resolve().parents[1]

        def files_present(
            arm,
        ):  # arms naming a file that a command makes (not in git) are checked where it exists
            files = [
                v for k, v in (arm.sleep.get("options") or {}).items() if k in ("forecaster", "checkpoint")
            ]
            return all((root / f).is_file() or Path(f).is_file() for f in files)

        arms = [a for a in cfg.arms if files_present(a)]
        if not any(a.sleep["strategy"] == "nino" for a in arms) or NINO.is_file():
            check_arms(dataclasses.replace(cfg, arms=arms))
    elif path.name.startswith("collect_"):
        from sleepbot.experiments import load_collect_config

        load_collect_config(path)
    else:
        cfg = resolve_run_config(path)
        if cfg.sleep.strategy != "none":
            assert sleep_from_config(cfg).strategy.name == cfg.sleep.strategy


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
        (["--sleep.strategy", "dream"], "unknown sleep.strategy 'dream'; valid: none, "),
        (["--sleep.horizon", "far"], "config key 'sleep.horizon' must be int, got 'far'"),
        (["--sleep.layers", "3"], "config key 'sleep.layers' must be list"),
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
