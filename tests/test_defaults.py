"""Each default declared once below the command line: wherever a default is stated again (the
model builders' signatures, `ModelSpec`, `AugmentConfig`, `BenchSettings`, the study schedule),
it is the training option's (`TrainConfig`'s field, whose default comes from the lowest layer
that needs it). A difference is a drift, unless this file names it and says why."""

import dataclasses
import inspect

from backend.exports import EXPORT_FORMATS
from bench.train import BenchSettings
from commands.bench import bench_pipeline_command
from commands.data import audit, download, make_demo_data_command
from commands.runs import export, predict
from data.audit import audit_dataset, deduplicate, fingerprints
from data.augment import AUGMENT_STYLES, KERAS_FLIP_PROB, AugmentConfig
from data.demo import make_demo_data
from data.discovery import make_splits
from data.download import DATASET
from data.loader import MRIBatches, scan_examples
from inference.evaluate import evaluate_examples, evaluate_run
from inference.run import TrainedRun, predict_files, read_images
from model.classifier import build_backbone, build_classifier, classification_head
from model.factory import build_model
from model.hybrid import build_hybrid
from model.spec import NO_WEIGHTS, UNCUT, ModelSpec
from model.weights import resolve_arch
from training.config import AUGMENTS, JIT_COMPILE, NO_AUGMENT, TrainConfig
from training.metrics import LOW_CONFIDENCE
from training.options import command_defaults
from training.recipes import RECIPES, STUDY_SCHEDULE
from training.schedule import Phase

DECLARED = command_defaults(TrainConfig)
# Fields named otherwise below the command line than their option.
OPTION_OF = {"name": "model", "style": "augment"}
BUILDERS = (build_classifier, build_hybrid, build_backbone, build_model, classification_head)
# Defaults that differ from the option's on purpose: (where, name) -> why.
ON_PURPOSE = {
    **{(fn.__name__, "weights"): "a builder never downloads unasked (model.spec.NO_WEIGHTS)" for fn in BUILDERS},
    **{(fn.__name__, "arch"): "a builder takes a resolved arch (ModelSpec's)" for fn in BUILDERS},
    ("ModelSpec", "arch"): "a spec holds the resolved arch; --arch defaults to what --weights implies",
    ("build_backbone", "cut"): "the plain classifier's whole backbone (model.spec.UNCUT), not the hybrid's --cut",
    ("BenchSettings", "data_dir"): "the benchmark makes phantom images when given no folder",
}


def drifts(where: str, stated: dict, declared: dict = DECLARED) -> list[str]:
    """`where: name = stated, declared D` for each stated default that is an option's and differs."""
    found = []
    for name, value in stated.items():
        option = OPTION_OF.get(name, name)
        if option not in declared or (where, name) in ON_PURPOSE:
            continue
        if value != declared[option] or type(value) is not type(declared[option]):
            found.append(f"{where}: {name} = {value!r}, declared {declared[option]!r} (--{option.replace('_', '-')})")
    return found


def signature_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_a_planted_drift_is_found():
    declared = {"dropout": 0.2, "head_filters": 256, "model": "resnet50", "weights": "imagenet", "image_size": 224}
    planted = {"dropout": 0.3, "head_filters": 256, "name": "hybrid", "weights": "none", "dropout_seed": 7,
               "image_size": 224.0}
    assert drifts("build_hybrid", planted, declared) == [
        "build_hybrid: dropout = 0.3, declared 0.2 (--dropout)",
        "build_hybrid: name = 'hybrid', declared 'resnet50' (--model)",
        "build_hybrid: image_size = 224.0, declared 224 (--image-size)",
    ]  # weights: on purpose (ON_PURPOSE); dropout_seed: no option's
    assert drifts("elsewhere", {"weights": "none"}, declared) == [
        "elsewhere: weights = 'none', declared 'imagenet' (--weights)"]


def test_the_model_builders_default_to_the_options():
    for fn in BUILDERS:
        assert drifts(fn.__name__, signature_defaults(fn)) == []
    assert signature_defaults(build_backbone)["cut"] == UNCUT
    # The defaults the options pass over (arch, dropout_seed, weights) are ModelSpec's and model.spec's.
    spec = field_defaults(ModelSpec)
    for fn in BUILDERS:
        stated = signature_defaults(fn)
        for name in {"arch", "dropout_seed"} & stated.keys():
            assert stated[name] == spec[name], f"{fn.__name__}: {name}"
        assert stated.get("weights", NO_WEIGHTS) == NO_WEIGHTS, fn.__name__


def test_model_spec_defaults_to_the_options():
    assert drifts("ModelSpec", field_defaults(ModelSpec)) == []
    # Its arch is the one the default --arch and --weights resolve to; a run's spec is the default spec.
    assert ModelSpec().arch == resolve_arch(DECLARED["arch"], DECLARED["weights"])
    config = TrainConfig(data_dir="d")
    assert config.model_spec() == dataclasses.replace(ModelSpec(), dropout_seed=config.seed)


def test_augmentation_defaults_to_the_options():
    assert drifts("AugmentConfig", field_defaults(AugmentConfig)) == []
    # ImageDataGenerator's ranges; its flip is Keras' horizontal_flip rule, its style its own.
    keras_generator = AugmentConfig.keras_generator()
    ranges = {name: getattr(keras_generator, name) for name in ("rotate_degrees", "shift_range", "zoom_range")}
    assert drifts("AugmentConfig.keras_generator()", ranges) == []
    assert (keras_generator.flip_prob, keras_generator.style) == (KERAS_FLIP_PROB, "keras-generator")
    assert TrainConfig(data_dir="d", augment="keras-generator").augment_config() == AugmentConfig.keras_generator()


def test_one_name_per_augmentation():
    """--augment's values are data.augment's style names (plus none): no second name for a style."""
    assert list(AUGMENTS) == [*AUGMENT_STYLES, NO_AUGMENT]
    for style in AUGMENT_STYLES:
        assert TrainConfig(data_dir="d", augment=style).augment_config().style == style
    assert AugmentConfig().style == DECLARED["augment"]


def test_bench_settings_default_to_the_options():
    assert drifts("BenchSettings", field_defaults(BenchSettings)) == []
    assert set(field_defaults(BenchSettings)) & set(DECLARED) == {
        "image_size", "batch_size", "precision", "jit_compile", "steps_per_execution", "workers", "data_dir",
        "learning_rate"}


def test_the_study_schedule_is_the_options_defaults():
    assert drifts("STUDY_SCHEDULE", STUDY_SCHEDULE) == []
    assert set(STUDY_SCHEDULE) <= set(DECLARED)
    for name in ("seed-keras", "seed-pytorch"):
        assert {k: RECIPES[name].options[k] for k in STUDY_SCHEDULE} == STUDY_SCHEDULE


def test_export_formats_are_one_table():
    choices = next(p for p in export.params if p.name == "format_").type.choices
    assert list(choices) == list(EXPORT_FORMATS)
    for fmt in EXPORT_FORMATS.values():
        assert set(fmt.needs) == {"tensorflow", "torch", "jax"}


# The input pipeline and the use of a finished run state the options' defaults (data',
# training.metrics'), some under another name: function -> {its name: the option's, or None for a
# parameter that only shares an option's name}.
NOT_THE_FLAG = {"cache": None, "augment": None}  # a DecodedCache and an AugmentConfig, not the flags
PIPELINE = {
    scan_examples: NOT_THE_FLAG, MRIBatches: NOT_THE_FLAG, audit_dataset: {}, deduplicate: {}, fingerprints: {},
    make_splits: {"seed": "split_seed"}, TrainedRun.logits: {}, TrainedRun.probabilities: {}, read_images: {},
    predict_files: {}, evaluate_examples: {}, evaluate_run: {},
}


def test_the_pipeline_and_the_use_of_a_run_default_to_the_options():
    declared = {**DECLARED, "threshold": LOW_CONFIDENCE}
    for fn, renamed in PIPELINE.items():
        stated = {renamed.get(name, name): value for name, value in signature_defaults(fn).items()
                  if renamed.get(name, name) is not None}
        assert drifts(fn.__qualname__, stated, declared) == []
    assert signature_defaults(make_splits)["seed"] == DECLARED["split_seed"]
    assert signature_defaults(predict_files)["threshold"] == LOW_CONFIDENCE
    assert {"workers", "batch_size"} <= signature_defaults(evaluate_examples).keys()


def test_a_phase_defaults_to_the_options():
    assert drifts("Phase", field_defaults(Phase), {**DECLARED, "schedule": DECLARED["lr_schedule"]}) == []
    assert Phase("p", 1, 1e-3).jit_compile == JIT_COMPILE[DECLARED["jit_compile"]]


def option_default(command, name: str):
    return next(p for p in command.params if p.name == name).default


def test_the_commands_default_to_what_they_call():
    assert option_default(predict, "threshold") == signature_defaults(predict_files)["threshold"]
    assert option_default(audit, "workers") == signature_defaults(audit_dataset)["workers"]
    demo = signature_defaults(make_demo_data)
    for name in ("train_per_class", "test_per_class", "seed"):
        assert option_default(make_demo_data_command, name) == demo[name], name
    assert option_default(download, "dataset") == DATASET
    assert option_default(bench_pipeline_command, "workers_levels") == str(DECLARED["workers"])
