"""logger.report_to takes any of transformers' reporting integrations; one whose package is missing is refused at
start-up with the package to install; wandb stays the default, offline without a login."""

import importlib.util
import os

import pytest

from finetune.base.errors import ConfigError
from finetune.cli.main import main
from finetune.recipe.keys import LOGGERS, REPORT_TO
from finetune.recipe.load import RECIPES_DIR, load_config


def hide(monkeypatch, *modules):
    """Make `modules` look uninstalled to importlib.util.find_spec (whether or not this machine has them)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_the_choices_are_transformers_integrations():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(LOGGERS) == set(INTEGRATION_TO_CALLBACK)
    assert REPORT_TO == (*LOGGERS, "none")


@pytest.mark.parametrize("option", sorted(p.stem for p in (RECIPES_DIR / "logger").glob("*.yaml")))
def test_every_logger_recipe_names_a_choice(option):
    assert load_config([f"logger={option}"]).logger.report_to in REPORT_TO


def test_a_missing_package_is_named_before_any_process_starts(capsys, monkeypatch):
    hide(monkeypatch, "mlflow")
    assert main(["--dry-run", "logger=mlflow"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: logger.report_to=mlflow needs the mlflow package: pip install mlflow (or logger=none).\n"
    )


def test_train_by_hand_refuses_before_the_model_loads(capsys, monkeypatch):
    import finetune.training.workflow as workflow

    hide(monkeypatch, "swanlab")
    monkeypatch.setattr(workflow, "build_trainer", lambda *a: pytest.fail("the model was loaded"))
    assert main(["train", "logger.report_to=swanlab"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: logger.report_to=swanlab needs the swanlab package: pip install swanlab (or logger=none)."
    )


def test_two_packages_and_a_dotted_module_are_named(monkeypatch):
    hide(monkeypatch, "dagshub", "azureml.core.run")
    with pytest.raises(ConfigError, match=r"needs the dagshub and mlflow packages: pip install dagshub mlflow \("):
        load_config(["logger.report_to=dagshub"]).logger.require_backend()
    with pytest.raises(ConfigError, match=r"needs the azureml-sdk package: pip install azureml-sdk \("):
        load_config(["logger.report_to=azure_ml"]).logger.require_backend()


def test_a_misspelt_backend_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"logger.report_to='mlfow' is not supported; .*did you mean 'mlflow'\?"):
        load_config(["logger.report_to=mlfow"])


def test_wandb_is_the_default_and_offline_without_a_login(monkeypatch, tmp_path):
    from finetune.training.trainer import configure_logger_backend

    for name in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    config = load_config([])
    assert config.logger.report_to == "wandb"
    config.logger.require_backend()  # installed with the project
    assert configure_logger_backend(config, tmp_path) == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline"
    mlflow = load_config(["logger=mlflow", "logger.project=colours"])
    assert configure_logger_backend(mlflow, tmp_path) == ["mlflow"]
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "colours"
