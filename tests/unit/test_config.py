"""Config loading: precedence, type coercion and every error path."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import pytest
import yaml

from finetune.core.config import (
    build_config,
    closest_key,
    coerce,
    config_to_dict,
    format_help,
    load_config,
    option,
    parse_argv,
    save_config,
    schema_keys,
)
from finetune.core.errors import ConfigError, UserError
from finetune.core.schemas import (
    ClassifyConfig,
    DataConfig,
    DataSourceConfig,
    ModelConfig,
    OutputConfig,
    ScoreConfig,
    ScoreLMConfig,
    ScoreLMModelConfig,
    SFTConfig,
    SFTDataConfig,
    SFTModelConfig,
    SFTOutputConfig,
    SFTTrainConfig,
    TrainConfig,
    inherited,
)


@dataclass
class Inner:
    """Inner group."""

    lr: float = option(1e-3, "learning rate", gt=0)
    steps: int | None = option(None, "steps", gt=0)
    kind: Literal["a", "b"] = option("a", "kind")
    flag: bool = option(False, "a flag")
    names: list[str] = option([], "names")


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)

    def check(self) -> list[str]:
        return ["train.kind=b needs train.flag=true"] if self.train.kind == "b" and not self.train.flag else []


def test_defaults_then_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  steps: 3\n")
    cfg = load_config(Outer, ["--config", str(path), "train.steps=7"])
    assert cfg.train.lr == 0.5  # from YAML
    assert cfg.train.steps == 7  # CLI beats YAML
    assert cfg.train.kind == "a"  # default


def test_default_path_is_used_without_config(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("train:\n  lr: 0.25\n")
    assert load_config(Outer, [], default_path=path).train.lr == 0.25


@pytest.mark.parametrize(
    ("raw", "tp", "expected"),
    [
        ("1e-4", float, 1e-4),  # YAML 1.1 reads 1e-4 as a string
        (3, float, 3.0),
        ("12", int, 12),
        (2.0, int, 2),
        ("true", bool, True),
        ("off", bool, False),
        ("null", int | None, None),
        ("5", int | None, 5),
        ("b", Literal["a", "b"], "b"),
        ("x,y", list[str], ["x", "y"]),
        (["x"], list[str], ["x"]),
        (7, str, "7"),
    ],
)
def test_coerce_accepts(raw, tp, expected):
    assert coerce(raw, tp) == expected


@pytest.mark.parametrize(
    ("raw", "tp"),
    [("abc", float), ("1.5", int), (True, int), ("maybe", bool), ("c", Literal["a", "b"]), ("x", int | None)],
)
def test_coerce_rejects(raw, tp):
    with pytest.raises(ValueError):
        coerce(raw, tp)


def test_all_problems_reported_together_with_source_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -1\n  kindd: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, ["--config", str(path), "trian.steps=3", "train.kind=c", "train.steps=zero"])
    text = str(err.value)
    assert len(err.value.problems) == 5
    assert f"train.lr ({path}): must be > 0" in text
    assert f"train.kindd ({path}): unknown key; did you mean `train.kind`?" in text
    assert "trian.steps (command line): unknown key; did you mean `train.steps`?" in text
    assert "train.kind (command line): expected one of a, b" in text
    assert "train.steps (command line): expected int | null" in text


@dataclass
class Switch:
    mode: Literal["on", "off", "auto"] = option("auto", "mode")


@dataclass
class WithSwitch:
    x: Switch = field(default_factory=Switch)


def test_string_choices_are_not_read_as_yaml_booleans():
    assert load_config(WithSwitch, ["x.mode=off"]).x.mode == "off"


def test_cross_field_check_runs_after_types():
    with pytest.raises(ConfigError, match="train.kind=b needs train.flag=true"):
        build_config(Outer, [("command line", {"train.kind": "b"})])


def test_group_given_a_value_and_unknown_group():
    with pytest.raises(ConfigError) as err:
        build_config(Outer, [("f.yaml", {"train": 3, "model": {"x": 1}})])
    assert "train (f.yaml): is a group of keys" in str(err.value)
    assert "model.x (f.yaml): unknown key" in str(err.value)


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_argv(["train.lr"])
    with pytest.raises(ConfigError, match="--config needs a path"):
        parse_argv(["--config"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Outer, ["--config", str(bad)])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Outer, ["--config", str(listy)])


def test_closest_key():
    keys = ["train.lr", "train.epochs", "data.max_length"]
    assert closest_key("trian.epochs", keys) == "train.epochs"
    assert closest_key("epochs", keys) == "train.epochs"
    assert closest_key("data.max_len", keys) == "data.max_length"
    assert closest_key("completely.different", keys) is None


def test_help_lists_every_key_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(ClassifyConfig, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text == format_help(ClassifyConfig) + "\n"
    assert "train.lr  (float, default: 5e-05)" in text
    assert "train.lr_scheduler  ({linear, cosine, constant}, default: linear)" in text
    for line in text.splitlines():
        if line.startswith("  ") and "(" in line and not line.startswith("      "):
            key = line.split()[0]
            assert key.count(".") == 1, key


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ClassifyConfig, ["train.lr=3e-5", "data.label_names=[neg,pos]", "train.max_grad_norm=null"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path, header="rerun with --config")
    assert path.read_text().startswith("# rerun with --config\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 3e-5
    assert load_config(ClassifyConfig, ["--config", str(path)]) == cfg


def test_classify_cross_field_checks():
    with pytest.raises(ConfigError) as err:
        load_config(
            ClassifyConfig,
            ["train.warmup_steps=10.5", "data.text_pair_column=text", "data.label_names=[a,a]"],
        )
    assert len(err.value.problems) == 3


def test_classify_checkpoint_and_metric_checks():
    with pytest.raises(ConfigError) as err:
        load_config(
            ClassifyConfig,
            ["output.overwrite=true", "train.resume_from=latest", "eval.metric_for_best=f1_weighted"],
        )
    problems = " ".join(err.value.problems)
    assert "output.overwrite=true and train.resume_from=latest" in problems
    assert "eval.metric_for_best='f1_weighted' must be one of eval.metrics ['accuracy', 'f1_macro']" in problems
    regression = load_config(ClassifyConfig, ["data.task=regression"])
    assert regression.resolved_metrics() == ["pearson", "spearman", "mse"] and regression.metric_for_best() == "pearson"


@dataclass
class Base:
    """Base group."""

    name: str = option("a", "the name")
    share: float = option(0.1, "a share", gt=0, lt=1)
    seed: int = option(1, "the seed")


@dataclass
class Derived(Base):
    """Derived group."""

    share: float = inherited(Base, "share", 0.5)
    extra: bool = option(False, "an extra key")
    name: str = inherited(Base, "name", help="another name")


@dataclass
class WithDerived:
    group: Derived = field(default_factory=Derived)


def test_a_subclass_group_overrides_defaults_and_docs_in_the_base_order():
    """A re-declared field keeps its place, the base's bounds and (unless given) its doc; new keys come last."""
    keys = schema_keys(Derived)
    assert list(keys) == ["name", "share", "seed", "extra"]
    assert (keys["name"].default, keys["name"].help) == ("a", "another name")
    assert (keys["share"].default, keys["share"].help, keys["share"].bounds) == (0.5, "a share", {"gt": 0, "lt": 1})
    assert list(config_to_dict(Derived())) == ["name", "share", "seed", "extra"]
    text = format_help(WithDerived)
    assert "group: Derived group." in text
    assert "  group.share  (float, default: 0.5)\n      a share" in text
    with pytest.raises(ConfigError, match=r"group.share \(command line\): must be < 1"):
        load_config(WithDerived, ["group.share=2"])


def test_recipe_and_scorer_groups_extend_the_shared_groups():
    """One chain: the SFT and finetune-eval groups subclass the shared ones, keeping their own defaults and docs."""
    assert issubclass(ScoreLMModelConfig, SFTModelConfig) and issubclass(SFTModelConfig, ModelConfig)
    assert issubclass(DataConfig, DataSourceConfig) and issubclass(SFTDataConfig, DataSourceConfig)
    assert issubclass(SFTTrainConfig, TrainConfig) and issubclass(SFTOutputConfig, OutputConfig)
    assert ScoreConfig.__dataclass_fields__["data"].default_factory is DataConfig
    assert ScoreLMConfig.__dataclass_fields__["data"].default_factory is SFTDataConfig
    shared = [f.name for f in fields(DataSourceConfig)]
    for group in (DataConfig, SFTDataConfig):
        assert [f.name for f in fields(group)][: len(shared)] == shared  # the shared keys first, in one order
    sft = schema_keys(SFTConfig)
    assert sft["model.name_or_path"].default == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sft["model.name_or_path"].help == schema_keys(ClassifyConfig)["model.name_or_path"].help
    assert sft["data.validation_fraction"].default == 0.05 and sft["data.validation_fraction"].bounds == {
        "gt": 0,
        "lt": 1,
    }
    assert sft["data.split_seed"].help == "seed of the random train/validation split"
    assert list(schema_keys(SFTModelConfig)) == [
        "name_or_path",
        "revision",
        "trust_remote_code",
        "quantization",
        "double_quant",
        "random_init",
        "attn_implementation",
    ]
    scorer = schema_keys(ScoreLMConfig)
    assert scorer["model.name_or_path"].default is None and scorer["model.name_or_path"].type == str | None
    assert scorer["model.revision"].help == "Hub revision of the base model of an adapter"
    assert scorer["model.trust_remote_code"].help == sft["model.trust_remote_code"].help
    with pytest.raises(ConfigError, match=r"data.validation_fraction \(command line\): must be < 1"):
        load_config(SFTConfig, ["data.validation_fraction=1.5"])


@pytest.mark.parametrize(
    ("args", "run_choice", "expected"),
    [
        ([], None, "loss"),
        ([], "perplexity", "perplexity"),
        ([], "exact_match", "loss"),  # the run's choice needs generations, which scoring does not make by default
        (["eval.num_generations=2"], "exact_match", "exact_match"),
        (["eval.metric_for_best=perplexity"], "loss", "perplexity"),
    ],
)
def test_lm_scorer_metric_for_best(args, run_choice, expected):
    assert load_config(ScoreLMConfig, args).metric_for_best(run_choice) == expected


def test_classifier_scorer_metrics_by_the_models_head():
    cfg = load_config(ScoreConfig, [])
    assert cfg.resolved_metrics(regression=True) == ["pearson", "spearman", "mse"]
    assert (cfg.metric_for_best(regression=False), cfg.metric_for_best(regression=True)) == ("accuracy", "pearson")
    assert load_config(ScoreConfig, ["eval.metric_for_best=loss"]).metric_for_best(regression=False) == "loss"
    with pytest.raises(UserError, match="must be one of the metrics"):
        load_config(ScoreConfig, ["eval.metric_for_best=pearson"]).metric_for_best(regression=False)
