"""Every kind of bad config value fails before work starts, naming the field and what is allowed."""

import copy
import re

import pytest
import torch
import yaml
from conftest import REPO_ROOT

from metaopt.cli import main
from metaopt.config import ConfigError, apply_overrides, load_config, validate_config

VALID = {
    "task": {"kind": "mnist_mlp", "activation": "sigmoid"},
    "evaluate": {"steps": 10, "runs": 4, "optimizers": [{"kind": "adam", "lr": 0.1}, {"kind": "sgd", "lr": 0.1}]},
}


def config_with(change):
    data = copy.deepcopy(VALID)
    change(data)
    return data


BAD = [
    (
        "unknown key",
        lambda d: d["evaluate"].update(stpes=3),
        r"evaluate\.stpes: unknown field; allowed fields here: steps, runs, seed",
    ),
    (
        "unknown nested key",
        lambda d: d["task"].update(hidden=3),
        r"task\.hidden: unknown field; allowed fields here: kind, activation, hidden_sizes",
    ),
    ("wrong type", lambda d: d["evaluate"].update(steps="many"), r"evaluate\.steps: Input should be a valid integer"),
    (
        "out of range",
        lambda d: d["evaluate"].update(runs=0),
        r"evaluate\.runs: Input should be greater than or equal to 1",
    ),
    (
        "bad choice",
        lambda d: d["task"].update(activation="softmax"),
        r"task\.activation: Input should be 'sigmoid', 'relu' or 'tanh' \(got 'softmax'\)",
    ),
    ("bad task kind", lambda d: d["task"].update(kind="cubic"), r"task: .*'cubic'.*'quadratic', 'mnist_mlp'"),
    (
        "bad optimizer",
        lambda d: d["evaluate"]["optimizers"][1].update(kind="adamw"),
        r"evaluate\.optimizers\[1\]\.kind: unknown optimizer 'adamw'; allowed: adam, ",
    ),
    (
        "negative lr",
        lambda d: d["evaluate"]["optimizers"][0].update(lr=-0.1),
        r"evaluate\.optimizers\[0\]\.lr: Input should be greater than 0",
    ),
    (
        "bad option",
        lambda d: d["evaluate"]["optimizers"][0].update(options={"betas": [0.9, 0.99]}),
        r"evaluate\.optimizers\[0\]: unknown option\(s\) betas for optimizer 'adam'; "
        r"allowed options: beta1, beta2, eps",
    ),
    ("lr and sweep", lambda d: d["evaluate"]["optimizers"][0].update(lr_sweep=[0.1]), r"either lr or lr_sweep"),
    ("duplicate names", lambda d: d["evaluate"]["optimizers"][1].update(kind="adam"), r"names must be unique.*adam"),
    ("missing section", lambda d: d.pop("task"), r"task: required field is missing"),
    (
        "bad split",
        lambda d: d["task"].update(data={"split": "validation"}),
        r"task\.data\.split: Input should be 'train' or 'test'",
    ),
    ("bad device", lambda d: d.update(device="tpu"), r"device: unknown device 'tpu'; allowed: auto, cpu, cuda"),
    (
        "schedule off the episode",
        lambda d: d.update(optimizer={"kind": "phnn", "options": {"horizon": 50}}, train={"episode_length": 100}),
        r"optimizer\.options\.horizon \(50\) must equal train\.episode_length \(100; one of a list\)",
    ),
    (
        "CPUs as a custom resource",
        lambda d: d.update(distributed={"resources": {"CPU": 1}}),
        r"distributed\.resources: set CPUs and GPUs with num_cpus and num_gpus, not in resources",
    ),
    (
        "unnamed resource",
        lambda d: d.update(distributed={"resources": {"": 1}}),
        r"distributed\.resources: a resource name must not be empty",
    ),
    (
        "finer than Ray's resources",
        lambda d: d.update(distributed={"resources": {"rollout": 0.00001}}),
        r"distributed\.resources\.rollout: Input should be greater than or equal to 0\.0001",
    ),
    (
        "no restart wait",
        lambda d: d.update(distributed={"restart_timeout": 0}),
        r"distributed\.restart_timeout: Input should be greater than 0",
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_field_and_allowed(case, change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(config_with(change))


def test_valid_config_gets_defaults():
    config = validate_config(copy.deepcopy(VALID))
    assert config.task.hidden_sizes == [20] and config.task.batch_size == 128
    assert config.task.data.split == "train" and config.evaluate.seed == 0
    assert [o.name for o in config.evaluate.optimizers] == ["adam", "sgd"]
    distributed = validate_config({**copy.deepcopy(VALID), "distributed": {}}).distributed
    assert distributed.resources == {} and distributed.restart_timeout == 600


def test_overrides_set_nested_values_and_list_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(VALID))
    config = load_config(
        path,
        [
            "evaluate.runs=7",
            "task.data.split=test",
            "evaluate.optimizers.0.lr=0.5",
            "task.hidden_sizes=[8, 4]",
            "evaluate.optimizers.2={kind: rmsprop, lr: 0.01}",
        ],
    )
    assert [o.name for o in config.evaluate.optimizers] == ["adam", "sgd", "rmsprop"]
    assert config.evaluate.runs == 7 and config.task.data.split == "test"
    assert config.evaluate.optimizers[0].lr == 0.5 and config.task.hidden_sizes == [8, 4]
    with pytest.raises(ConfigError, match=r"evaluate\.runs: Input should be greater than or equal to 1"):
        load_config(path, ["evaluate.runs=-1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluate.runs", r"--set expects KEY=VALUE"),
        ("evaluate.optimizers.5.lr=1", r"'5' is not an index of a list of 2 items \(0-1, or 2 to append\)"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(copy.deepcopy(VALID), [override])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


TRAIN = str(REPO_ROOT / "jobs" / "configs" / "train_quadratic_phnn.yaml")
IN_PROCESS = ["--set", "distributed=null", "--no-tracking", "--no-progress"]


def module_task(factory: str) -> list[str]:
    return ["--set", f"task={{kind: module, factory: '{factory}'}}"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", TRAIN, "--set", "train.meta_steps=[1"],
            r"--set train.meta_steps=\[1: '\[1' is not a YAML value \(expected ',' or '\]', but got '<stream end>'\)",
        ),
        (["train", "latin1.yaml"], r"config file latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 29\)"),
        (
            ["train", TRAIN, *module_task("nosuch.module:fn"), *IN_PROCESS],
            r"task.factory: task factory 'nosuch.module:fn': cannot import 'nosuch.module'",
        ),
        (
            ["train", TRAIN, *module_task("module_tasks:unreachable_data"), *IN_PROCESS],
            r"task.factory 'module_tasks:unreachable_data' raised RuntimeError: the dataset server did not answer",
        ),
        (
            ["train", TRAIN, *module_task("module_tasks:not_a_task"), *IN_PROCESS],
            r"task.factory 'module_tasks:not_a_task' returned a dict, not a metaopt.tasks.ModuleTaskSpec",
        ),
        (
            ["registry", "--tracking-uri", "sqlite:///registry.db", "register", "pretrained:general", "bad name/x"],
            r"cannot register 'bad name/x': Invalid model name 'bad name/x'. Names cannot contain '/' or ':'",
        ),
        (
            ["registry", "--tracking-uri", "sqlite:///registry.db", "register", "listed", "general"],
            r"checkpoint listed is corrupt: spec.json holds a JSON list, not an object",
        ),
    ]
    + [
        (
            ["train", TRAIN, "--set", "device=cuda", *IN_PROCESS],
            r"device: cuda, but torch finds no CUDA GPU on this machine",
        )
    ]
    * (not torch.cuda.is_available()),
    ids=["set-yaml", "not-utf8", "factory-import", "factory-raises", "factory-returns", "model-name", "spec-list"]
    + ["no-gpu"] * (not torch.cuda.is_available()),
)
def test_bad_input_is_one_error_naming_it(argv, message, tmp_path, monkeypatch, capsys):
    """What `metaopt` prints for each, and that it writes nothing: no run folder, no MLflow store."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("task:\n  kind: quadratic\n# caf\u00e9\n".encode("latin-1"))
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "spec.json").write_text("[1, 2]")
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"metaopt {argv[0]}: error: ") and re.search(message, error), error
    assert len(error.splitlines()) <= 2, error  # an invalid config's heading, then its one field
    assert sorted(tmp_path.rglob("*")) == before


def test_every_shipped_config_is_valid():
    from pathlib import Path

    from metaopt.benchmark import load_suite
    from metaopt.tune import load_search

    configs = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
    searches = [path for path in configs if path.name.startswith("tune_")]
    suites = [path for path in configs if path.name.startswith("suite_")]
    assert len(configs) - len(searches) - len(suites) >= 12 and len(searches) >= 3 and suites
    for path in configs:
        load_search(path) if path in searches else load_suite(path) if path in suites else load_config(path)
