"""Options declared once: every command's defaults are the config's, --config reproduces a
run, parity feeds the batch `pipeline-hash` hashes, and what a finished run directory keeps."""

import dataclasses
import json
import zipfile

import h5py
import pytest
from click.testing import CliRunner

from checksums import file_sha256
from cli import cli
from commands.data import pipeline_hash_command
from commands.studies import compare
from commands.training import hybrid, init_weights, train
from data.augment import AugmentConfig
from tests.conftest import SMALL_MODEL_FLAGS, active_backend
from tests.test_cli import run_subprocess
from training.config import HYBRID_RECIPE, TrainConfig
from training.options import cli_fields, command_defaults


def cli_defaults(command, args: list[str] | None = None) -> dict:
    """The values a command's options take when nothing is given (parsed, not run)."""
    ctx = command.make_context(command.name, list(args or ["--data-dir", "d"]), resilient_parsing=False)
    return ctx.params


def test_every_train_option_defaults_to_the_config_default():
    params = cli_defaults(train)
    config = TrainConfig(data_dir="d")
    fields = [f.name for f in cli_fields(TrainConfig)]
    # runs_root is not an option; recipe is one, made by preset_option (it sets other defaults).
    assert set(fields) == {f.name for f in dataclasses.fields(TrainConfig)} - {"runs_root", "recipe"}
    assert params["recipe"] is None and config.recipe is None
    for name in fields:
        assert params[name] == getattr(config, name), name
    # The augmentation ranges are declared once, in data.augment.
    assert (config.crop_scale, config.crop_ratio) == (AugmentConfig().crop_scale, AugmentConfig().crop_ratio)
    assert config.augment_config() == AugmentConfig()


def test_hybrid_defaults_are_the_config_defaults_with_its_recipe():
    params = cli_defaults(hybrid)
    expected = command_defaults(TrainConfig, HYBRID_RECIPE)
    assert {k: params[k] for k in expected if k != "data_dir"} == {k: v for k, v in expected.items() if k != "data_dir"}
    assert params["model"] == "hybrid" and params["epochs"] == 4 and params["learning_rate"] == 1e-5
    assert params["crop_ratio"] == TrainConfig.crop_ratio


def test_compare_pipeline_hash_and_init_weights_share_the_declarations():
    config = TrainConfig(data_dir="d")
    grid = cli_defaults(compare)
    for name in ("model", "preprocess", "augment", "weights"):
        assert grid[name] == [getattr(config, name)]  # a grid of one level
    assert all(grid[k] == getattr(config, k) for k in ("epochs", "learning_rate", "crop_ratio", "keep_checkpoints"))
    hashed = cli_defaults(pipeline_hash_command)
    assert all(hashed[k] == getattr(config, k) for k in ("image_size", "batch_size", "crop_scale", "crop_ratio", "augment"))
    built = cli_defaults(init_weights, ["w.weights.h5"])
    assert all(built[k] == getattr(config, k) for k in ("image_size", "weights", "seed", "model", "cut", "se"))


def test_a_config_file_supplies_defaults_that_the_command_line_overrides(tmp_path):
    run_config = {"options": dict(dataclasses.asdict(TrainConfig(data_dir="data", epochs=3, crop_ratio=(0.5, 2.0))),
                                  out="somewhere/else")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(run_config))
    params = cli_defaults(train, ["--config", str(path), "--lr", "0.01"])
    assert params["data_dir"] == "data" and params["epochs"] == 3 and params["crop_ratio"] == (0.5, 2.0)
    assert params["learning_rate"] == 0.01  # the command line wins
    assert params["out"] is None  # where a run goes is never taken from the file
    grid = cli_defaults(compare, ["--config", str(path)])  # a run's --seed becomes compare's --seeds
    assert grid["seeds"] == [0] and grid["preprocess"] == ["caffe"]


@pytest.mark.parametrize("content, message", [
    ('{"epochs": 2, "colour": "red"}', "unknown option(s) colour"),
    ("[1, 2]", "holds no JSON object"),
    ("{not json", "is not a readable JSON file"),
])
def test_a_bad_config_file_is_refused_before_anything_runs(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="backend-independent bytes; runs once, in the jax pass")
def test_parity_batch_is_batch_0_of_a_default_train_run(demo_dir):
    from studies.parity import ParityConfig, parity_batch

    cfg = ParityConfig(backends=("torch", "jax"), data_dir=str(demo_dir))
    _, _, digest = parity_batch(cfg, cfg.preprocess)
    result = CliRunner().invoke(cli, ["pipeline-hash", "--data-dir", str(demo_dir), "--image-size", str(cfg.image_size),
                                      "--batch-size", str(cfg.batch_size), "--batches", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.split()[0] == digest


def _train(*args: str):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


@pytest.mark.slow
def test_config_file_of_a_run_retrains_the_same_run(demo_dir, tmp_path):
    """Each run in its own process, as a user runs them (in one process Keras numbers its
    layers on, so the weights file's names, not its values, would differ). Reading a config file
    is backend-free and each backend's bit-for-bit determinism is test_resume's: once, in the
    torch pass."""
    if active_backend() != "torch":
        pytest.skip("backend-free option handling; runs once, in the torch pass")
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_subprocess("train", "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8",
                            "--epochs", "1", "--weights", "none", "--crop-scale", "0.5,1", "--rotate-degrees", "5",
                            "--deterministic", "--keep-checkpoints", "none", "--out", str(first), "--verbose", "0",
                            *SMALL_MODEL_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_subprocess("train", "--config", str(first / "config.json"), "--out", str(second))
    assert result.returncode == 0, result.stderr[-3000:]
    configs = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert {k: v for k, v in configs[0]["options"].items() if k != "out"} == \
           {k: v for k, v in configs[1]["options"].items() if k != "out"}
    hashes = [CliRunner().invoke(cli, ["pipeline-hash", "--config", str(d / "config.json")]).output.split()[0]
              for d in (first, second)]
    assert hashes[0] == hashes[1]
    assert configs[0]["starting_weights"]["initial"]["sha256"] == configs[1]["starting_weights"]["initial"]["sha256"]
    losses = [json.loads((d / "metrics.json").read_text())["train"]["loss"] for d in (first, second)]
    assert losses[0] == losses[1]  # --deterministic, same start, same batches
    # --keep-checkpoints none: model.keras alone holds the trained weights.
    assert not (first / "best.weights.h5").exists() and not (first / "last.weights.h5").exists()


def _optimizer_groups(h5_file) -> list[str]:
    found = []
    h5_file.visit(lambda name: found.append(name) if "optimizer" in name else None)
    return found


@pytest.mark.slow
def test_keep_checkpoints_all_keeps_what_resumes_and_no_file_repeats_the_optimizer(demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = _train("--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                    "--weights", "none", "--keep-checkpoints", "all", "--out", str(run_dir), "--verbose", "0",
                    *SMALL_MODEL_FLAGS)
    assert result.exit_code == 0, result.output
    with h5py.File(run_dir / "last.weights.h5", "r") as f:
        assert _optimizer_groups(f)  # a resume needs Adam's moments
    with h5py.File(run_dir / "best.weights.h5", "r") as f:
        assert not _optimizer_groups(f) and "training_state" in f.attrs
    with zipfile.ZipFile(run_dir / "model.keras") as archive, h5py.File(archive.open("model.weights.h5"), "r") as f:
        assert not _optimizer_groups(f)
    weights_mb = (run_dir / "initial.weights.h5").stat().st_size / 2**20
    assert (run_dir / "last.weights.h5").stat().st_size / 2**20 > 2.5 * weights_mb  # weights + two moments
    for name in ("best.weights.h5", "model.keras"):
        assert (run_dir / name).stat().st_size / 2**20 < 1.05 * weights_mb, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["starting_weights"]["initial"]["sha256"] == file_sha256(run_dir / "initial.weights.h5")


def test_the_options_reference_is_generated_from_the_cli():
    """docs/options.md is what scripts/options-doc writes from these declarations."""
    from markdown_tables import markdown_table
    from tests.conftest import ROOT
    from training.options import options_reference

    text = options_reference(cli, markdown_table)
    assert (ROOT / "docs" / "options.md").read_text() == text, "run scripts/options-doc"
    assert "## `train`" in text and "| `--keep-checkpoints` |" in text and "| `--lr` | FLOAT>0 | 0.0001 |" in text
