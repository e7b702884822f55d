"""Checkpoints: round trips for every recipe, atomic replacement, clear errors, no pickle."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from flowforge.checkpoint import (
    TRAINING_STATE_FIELDS,
    CheckpointError,
    check_training_manifest,
    decode_state,
    encode_state,
    load_model,
    load_state_dict_checked,
    load_tensors,
    read_manifest,
    save_checkpoint,
    save_model,
)
from flowforge.flows import CNF, IAF, MAF, NICE, NSF, Flow, RealNVP
from flowforge.train.state import TrainingParts, TrainingState, rng_state, save_training_state
from tests.invariants import edit_checkpoint

RECIPES = [
    (RealNVP, {"features": 3, "context": 2, "transforms": 2, "hidden": (8,)}),
    (NICE, {"features": 3, "transforms": 2, "hidden": (8,)}),
    (MAF, {"features": 3, "transforms": 2, "hidden": (8,), "mixing": "lu", "batch_norm": True}),
    (IAF, {"features": 3, "transforms": 2, "hidden": (8,)}),
    (NSF, {"features": 3, "context": 2, "transforms": 2, "hidden": (8,), "bins": 4}),
    (CNF, {"features": 3, "hidden": (8,), "method": "rk4", "steps": 4}),
]


def _randomize(flow: Flow) -> None:
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(("recipe", "options"), RECIPES, ids=[r.__name__ for r, _ in RECIPES])
def test_every_recipe_round_trips_through_a_checkpoint(recipe, options: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    flow = recipe(**options).double()
    _randomize(flow)
    flow.eval()
    flow.save(tmp_path / "ckpt", metadata={"note": "test"})
    loaded = Flow.load(tmp_path / "ckpt").eval()
    assert type(loaded) is recipe
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(5, 3, dtype=torch.float64)
    context = torch.randn(5, 2, dtype=torch.float64) if options.get("context") else None
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, context), flow.log_prob(x, context), rtol=0, atol=0)
    assert read_manifest(tmp_path / "ckpt")["metadata"] == {"note": "test"}
    assert recipe.load(tmp_path / "ckpt").to_config() == flow.to_config()


def test_saving_again_replaces_the_checkpoint_and_removes_stale_files(tmp_path: Path) -> None:
    flow = RealNVP(2, transforms=2)
    flow.save(tmp_path)
    _randomize(flow)
    flow.save(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
    x = torch.randn(4, 2)
    torch.testing.assert_close(Flow.load(tmp_path).log_prob(x), flow.log_prob(x))


def test_damaged_and_foreign_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    RealNVP(2, transforms=2).save(tmp_path / "good")
    weights = next((tmp_path / "good").glob("*.safetensors"))
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        Flow.load(tmp_path / "good")
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        Flow.load(tmp_path / "good")
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Flow.load(tmp_path / "good")

    with pytest.raises(CheckpointError, match=r"checkpoint\.json is missing"):
        Flow.load(tmp_path / "nothing-here")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.json").write_text(json.dumps({"weights": "model.bin"}))
    with pytest.raises(CheckpointError, match="not a flowforge checkpoint"):
        Flow.load(foreign)
    (foreign / "checkpoint.json").write_text('{"format": "flowforge-checkpoint", "cl')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Flow.load(foreign)


def test_loading_checks_the_class_and_the_shapes(tmp_path: Path) -> None:
    RealNVP(2, transforms=2).save(tmp_path / "realnvp")
    with pytest.raises(CheckpointError, match="holds a RealNVP, not a MAF"):
        MAF.load(tmp_path / "realnvp")
    manifest = json.loads((tmp_path / "realnvp" / "checkpoint.json").read_text())
    manifest["model"]["arguments"]["hidden"] = [7]  # the weights no longer fit the rebuilt flow
    (tmp_path / "realnvp" / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"its settings .* are not the ones model-.* was saved with"):
        Flow.load(tmp_path / "realnvp")  # a plain edit: the settings digest in the model file differs
    manifest["version"] = 1  # claiming the format before the digest does not skip it
    (tmp_path / "realnvp" / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="the manifest was edited"):
        Flow.load(tmp_path / "realnvp")
    manifest["version"] = 2
    (tmp_path / "realnvp" / "checkpoint.json").write_text(json.dumps(manifest))
    edit_checkpoint(tmp_path / "realnvp", lambda record: record["model"]["arguments"].__setitem__("hidden", [7]))
    with pytest.raises(CheckpointError, match="do not fit"):
        Flow.load(tmp_path / "realnvp")  # saved as flowforge would: the shapes are what disagrees


def test_a_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before the registry ("class" + plain "config") rebuild through it."""
    flow = RealNVP(2, transforms=2, hidden=(8,))
    flow.save(tmp_path / "old")
    path = tmp_path / "old" / "checkpoint.json"
    manifest = json.loads(path.read_text())
    config = manifest.pop("model")["arguments"]
    del config["activation"]  # version 1 left it out
    manifest.update(version=1, config=config)
    manifest["class"] = "RealNVP"
    weights = tmp_path / "old" / manifest["files"]["model"]["file"]
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)  # version 1 kept no digest there
    manifest["files"]["model"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
    x = torch.randn(4, 2)
    torch.testing.assert_close(Flow.load(tmp_path / "old").log_prob(x), flow.log_prob(x))


def test_optimizer_state_round_trips_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(optimizer.state_dict(), tensors)
    save_checkpoint(tmp_path, {"optimizer": tensors}, {"optimizer": encoded})
    manifest = read_manifest(tmp_path)
    restored = decode_state(manifest["optimizer"], load_tensors(tmp_path, "optimizer", manifest))
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.Adam(twin.parameters())
    twin_optimizer.load_state_dict(restored)
    assert twin_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    batch = torch.randn(4, 3)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        m(batch).square().sum().backward()
        opt.step()
    torch.testing.assert_close(twin.weight, model.weight, rtol=0, atol=0)


def test_unsupported_state_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot store a object"):
        encode_state({"x": object()}, {})


def test_the_package_never_unpickles() -> None:
    source = Path(__file__).resolve().parents[1] / "src" / "flowforge"
    calls = ("torch.load(", "import pickle", "pickle.load", "import dill", "allow_pickle=True")
    offenders = [(p.name, c) for p in source.rglob("*.py") for c in calls if c in p.read_text()]
    assert offenders == []


# ---------------------------------------------------------------- hostile manifests
DELETE = object()


def _training_checkpoint(directory: Path) -> Path:
    """A resumable training checkpoint of a registered model: every key a hostile manifest can damage."""
    torch.manual_seed(0)
    model = RealNVP(2, transforms=2, hidden=(8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 2))[1].sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    parts = TrainingParts(model, optimizer, scheduler, scaler=None, objective=object())
    return save_training_state(
        directory,
        parts,
        state=TrainingState(step=1, history=[{"step": 1, "loss": 0.5, "lr": 0.01}]),
        config={"steps": 10, "lr": 0.01},
        rng_states=[rng_state()],
    )


def _damage(directory: Path, key: str, change: Any) -> None:
    """Set (or delete, or transform with a callable) the manifest entry at the dotted ``key``."""
    path = directory / "checkpoint.json"
    manifest = json.loads(path.read_text())
    *parents, last = key.split(".")
    table = manifest
    for parent in parents:
        table = table[parent]
    if change is DELETE:
        del table[last]
    elif callable(change):
        table[last] = change(table[last])
    else:
        table[last] = change
    path.write_text(json.dumps(manifest))


# (key to damage, new value / DELETE / callable(old), regex the message must hold after "checkpoint.json: ")
BAD_MANIFESTS: list[tuple[str, Any, str]] = [
    ("files.model.sha256", DELETE, r"files\.model\.sha256 is missing; expected 64 hex digits"),
    ("files.model.sha256", "xyz", r"files\.model\.sha256 is 'xyz'; expected 64 hex digits"),
    ("files.model.sha256", 12, r"files\.model\.sha256 is 12 \(int\); expected 64 hex digits"),
    ("files.model.file", DELETE, r"files\.model\.file is missing; expected a plain file name"),
    ("files.model.file", 7, r"files\.model\.file is 7 \(int\); expected a plain file name"),
    ("files.model.size", 10, r"files\.model has an unknown key 'size'; expected only file and sha256"),
    ("files.model", "model.safetensors", r"files\.model is 'model\.safetensors'; expected an object"),
    ("files", lambda files: list(files.values()), r"files is \[.*; expected an object"),
    ("files", DELETE, r"files is missing; expected an object"),
    ("dtype", "int64", r"dtype is 'int64'; expected a floating-point torch dtype"),
    ("dtype", 32, r"dtype is 32 \(int\); expected a floating-point torch dtype"),
    ("dtype", "manual_seed", r"dtype is 'manual_seed'; expected a floating-point torch dtype"),
    ("version", "2", r"version is '2'; expected an integer from 1 to 2"),
    ("version", 3, r"version is 3 \(int\); expected an integer from 1 to 2 \(a newer flowforge"),
    ("version", 0, r"version is 0 \(int\); expected an integer from 1 to 2"),
    ("version", True, r"version is True \(bool\); expected an integer"),
    ("version", DELETE, r"version is missing; expected an integer"),
    ("metadata", ["note"], r"metadata is \['note'\]; expected an object"),
    ("model", "realnvp", r"model is 'realnvp'; expected null or an object"),
    ("class", 5, r"class is 5 \(int\); expected a class name"),
]
# The same for what resuming a run reads (read_manifest(..., training=True)).
BAD_TRAINING_MANIFESTS: list[tuple[str, Any, str]] = [
    ("trainer", DELETE, r"trainer is missing; .* holds weights only"),
    ("trainer", [1], r"trainer is \[1\]; expected an object"),
    ("trainer_config", DELETE, r"trainer_config is missing; expected an object"),
    ("trainer_config", "fast", r"trainer_config is 'fast'; expected an object"),
    ("trainer.optimizer", DELETE, r"trainer\.optimizer is missing; expected an object"),
    ("trainer.scheduler", 3, r"trainer\.scheduler is 3 \(int\); expected an object"),
    ("trainer.scaler", DELETE, r"trainer\.scaler is missing; expected null or an object"),
    ("trainer.objective", "adam", r"trainer\.objective is 'adam'; expected null or an object"),
    ("trainer.rng", DELETE, r"trainer\.rng is missing; expected a non-empty list"),
    ("trainer.rng", [], r"trainer\.rng is \[\]; expected a non-empty list"),
    ("trainer.rng", [{"torch": {}, "python": []}], r"trainer\.rng\[0\]\.numpy is missing"),
    ("trainer.state", lambda state: {**state, "epoch": 3}, r"trainer\.state has an unknown key 'epoch'"),
    ("trainer.state", None, r"trainer\.state is None; expected an object"),
    ("trainer.state.step", "ten", r"trainer\.state\.step is 'ten'; expected int"),
    ("trainer.state.step", 1.5, r"trainer\.state\.step is 1\.5 \(float\); expected int"),
    ("trainer.state.history", {}, r"trainer\.state\.history is \{\}; expected list"),
    ("files.trainer", DELETE, r"files\.trainer is missing"),
]


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _training_checkpoint(tmp_path_factory.mktemp("training") / "ckpt")


def test_the_intact_training_checkpoint_passes_every_check(training_checkpoint: Path) -> None:
    manifest = read_manifest(training_checkpoint, training=True)
    assert check_training_manifest(manifest, training_checkpoint) is manifest
    assert isinstance(load_model(training_checkpoint), RealNVP)
    assert set(load_tensors(training_checkpoint, "trainer")) and set(load_tensors(training_checkpoint, "model"))


@pytest.mark.parametrize(("key", "change", "message"), BAD_MANIFESTS, ids=[f"{k}={c!r}" for k, c, _ in BAD_MANIFESTS])
def test_every_bad_manifest_gives_a_checkpoint_error_naming_the_file_and_key(
    training_checkpoint: Path, key: str, change: Any, message: str, tmp_path: Path
) -> None:
    directory = shutil.copytree(training_checkpoint, tmp_path / "ckpt")
    _damage(directory, key, change)
    pattern = r"checkpoint\.json: " + message
    loaders: list[Callable[[], object]] = [
        lambda: read_manifest(directory),
        lambda: read_manifest(directory, training=True),
        lambda: load_model(directory),
        lambda: Flow.load(directory),
        lambda: load_tensors(directory, "model"),
    ]
    for load in loaders:
        with pytest.raises(CheckpointError, match=pattern):  # never a KeyError, TypeError or AttributeError
            load()


@pytest.mark.parametrize(
    ("key", "change", "message"), BAD_TRAINING_MANIFESTS, ids=[f"{k}={c!r}" for k, c, _ in BAD_TRAINING_MANIFESTS]
)
def test_every_bad_training_manifest_gives_a_checkpoint_error_naming_the_file_and_key(
    training_checkpoint: Path, key: str, change: Any, message: str, tmp_path: Path
) -> None:
    directory = shutil.copytree(training_checkpoint, tmp_path / "ckpt")
    _damage(directory, key, change)
    pattern = r"checkpoint\.json: " + message
    with pytest.raises(CheckpointError, match=pattern):
        read_manifest(directory, training=True)
    manifest = json.loads((directory / "checkpoint.json").read_text())
    with pytest.raises(CheckpointError, match=pattern):
        check_training_manifest(manifest, directory)


def test_the_known_training_counters_are_those_of_training_state() -> None:
    assert list(TRAINING_STATE_FIELDS) == [f.name for f in dataclasses.fields(TrainingState)]


def test_a_training_checkpoint_from_before_per_process_random_states_passes(training_checkpoint: Path) -> None:
    manifest = read_manifest(training_checkpoint)
    trainer = dict(manifest["trainer"])
    rng = trainer.pop("rng")[0]
    trainer.update(torch_rng=rng["torch"], python_rng=rng["python"], numpy_rng=rng["numpy"])
    check_training_manifest({**manifest, "trainer": trainer}, training_checkpoint)


def test_damaged_encoded_state_gives_a_checkpoint_error() -> None:
    tensors = {"t0": torch.zeros(1)}
    for bad in ({"__tensor__": "t9"}, {"__tensor__": ["t0"]}, {"__items__": [[1]]}, {"__items__": [[{}, 1]]}):
        with pytest.raises(CheckpointError, match="checkpoint"):
            decode_state(bad, tensors)


# ---------------------------------------------------------------- paths that leave the folder
def _escape(case: str, tmp_path: Path) -> Path:
    """A checkpoint whose model entry reaches a (valid, hash-matching) weights file outside its folder."""
    directory = tmp_path / "ckpt"
    RealNVP(2, transforms=2).save(directory)
    inside = next(directory.glob("*.safetensors"))
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    inside.rename(outside)
    if case == "parent":
        entry = "../elsewhere/model.safetensors"
    elif case == "absolute":
        entry = str(outside.resolve())
    else:
        entry = "model-link.safetensors"
        (directory / entry).symlink_to(outside)
    _damage(directory, "files.model.file", entry)
    return directory


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink"])
def test_file_entries_never_lead_out_of_the_checkpoint_folder(case: str, tmp_path: Path) -> None:
    directory = _escape(case, tmp_path)
    if case == "symlink":  # a plain name: only resolving it shows where it leads
        pattern = (
            r"checkpoint\.json: files\.model\.file is 'model-link\.safetensors'; expected a file inside .*elsewhere"
        )
    else:
        pattern = r"checkpoint\.json: files\.model\.file is .*; expected a plain file name inside the checkpoint folder"
        with pytest.raises(CheckpointError, match=pattern):
            read_manifest(directory)
    for load in (lambda: Flow.load(directory), lambda: load_model(directory), lambda: load_tensors(directory, "model")):
        with pytest.raises(CheckpointError, match=pattern):
            load()


def test_a_symlink_inside_the_folder_still_loads(tmp_path: Path) -> None:
    flow = RealNVP(2, transforms=2)
    flow.save(tmp_path)
    real = next(tmp_path.glob("*.safetensors"))
    (tmp_path / "alias.safetensors").symlink_to(real.name)
    _damage(tmp_path, "files.model.file", "alias.safetensors")
    x = torch.randn(3, 2)
    torch.testing.assert_close(Flow.load(tmp_path).log_prob(x), flow.log_prob(x))


def test_tensor_groups_must_be_plain_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain name"):
        save_checkpoint(tmp_path / "ckpt", {"../model": {"w": torch.zeros(1)}}, {})
    assert not list(tmp_path.rglob("*.safetensors"))


# ---------------------------------------------------------------- writes killed midway
def test_temporary_files_of_a_killed_write_are_never_read_and_removed_by_the_next_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    flow, other = RealNVP(2, transforms=2), RealNVP(2, transforms=2)
    _randomize(other)
    flow.save(tmp_path / "ckpt", metadata={"which": "real"})
    directory = tmp_path / "ckpt"
    # What a save killed between writing its temporary files and renaming them leaves: other weights
    # and a manifest naming them (a plain, hash-matching, hidden name).
    other.save(tmp_path / "other", metadata={"which": "temporary"})
    weights = next((tmp_path / "other").glob("*.safetensors")).read_bytes()
    (directory / ".model-x.safetensors.y.tmp").write_bytes(weights)
    manifest = json.loads((tmp_path / "other" / "checkpoint.json").read_text())
    manifest["files"]["model"]["file"] = ".model-x.safetensors.y.tmp"
    (directory / ".checkpoint.json.abc.tmp").write_text(json.dumps(manifest))
    (directory / ".metrics.csv.abc.tmp").write_text("not ours")  # another writer's temporary file: left alone

    x = torch.randn(4, 2)
    assert read_manifest(directory)["metadata"] == {"which": "real"}
    with torch.no_grad():
        torch.testing.assert_close(Flow.load(directory).log_prob(x), flow.log_prob(x), rtol=0, atol=0)

    hostile = tmp_path / "hostile"  # a manifest that names the temporary file is refused, not read
    hostile.mkdir()
    shutil.copy(directory / ".model-x.safetensors.y.tmp", hostile)
    (hostile / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: files\.model\.file is '\.model-x"):
        Flow.load(hostile)

    flow.save(directory, metadata={"which": "real"})
    assert sorted(p.name for p in directory.glob(".*.tmp")) == [".metrics.csv.abc.tmp"]
    assert len(list(directory.glob("*.safetensors"))) == 1
    with torch.no_grad():
        torch.testing.assert_close(Flow.load(directory).log_prob(x), flow.log_prob(x), rtol=0, atol=0)


def test_a_buffer_holding_nan_is_refused_on_load_and_a_mask_of_minus_inf_is_not() -> None:
    """A normaliser's statistics are buffers: NaN there makes every output NaN, so loading refuses it;
    -inf is a legitimate value of an attention mask, so only NaN is refused."""

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

    state = Normalised().state_dict()
    load_state_dict_checked(Normalised(), state, "ok")
    state["scale"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(CheckpointError, match=r"the buffers in bad hold NaN \(scale\)"):
        load_state_dict_checked(Normalised(), state, "bad")


def test_metadata_that_would_not_read_back_is_refused_at_save(tmp_path: Path) -> None:
    flow = RealNVP(2, transforms=2)
    for metadata, error, message in (
        ("x", TypeError, "metadata must be a dict of JSON values, got str"),
        ({"a": object()}, ValueError, "metadata must hold JSON values"),
        ({"loss": float("nan")}, ValueError, "metadata must hold JSON values"),
        ({1: 2}, ValueError, r"keys must be strings .*would load as \{'1': 2\}"),
        ({"shape": (1, 2)}, ValueError, "its sequences lists"),
    ):
        with pytest.raises(error, match=message):
            save_model(tmp_path / "m", flow, metadata)
        assert not (tmp_path / "m").exists()
    save_model(tmp_path / "m", flow, {"steps": 3, "note": ["a", 1.5]})
    assert read_manifest(tmp_path / "m")["metadata"] == {"steps": 3, "note": ["a", 1.5]}


def test_atomic_writes_get_the_permissions_of_an_ordinary_write(tmp_path: Path) -> None:
    """A temporary file is made readable by its owner alone; the file it becomes follows the umask."""
    import os

    from flowforge.checkpoint import write_atomic

    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"x")
    atomic = tmp_path / "atomic"
    write_atomic(atomic, b"x")
    assert atomic.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_save_keeps_the_users_own_tensor_files_and_repairs_a_damaged_one(tmp_path: Path) -> None:
    (tmp_path / "my_pretrained_encoder.safetensors").write_bytes(b"the user's")
    (tmp_path / "notes.txt").write_text("kept")
    model = RealNVP(2, transforms=2, hidden=(8,))
    save_model(tmp_path, model)
    assert (tmp_path / "my_pretrained_encoder.safetensors").read_bytes() == b"the user's"
    assert (tmp_path / "notes.txt").exists()
    weights = next(tmp_path.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:40])  # damaged in place, same name
    save_model(tmp_path, model)  # saving the same model again writes the file anew
    reloaded = load_model(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(tmp_path, model)  # other weights: the earlier save's tensor file goes
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 1


def test_a_save_with_a_value_that_is_no_tensor_writes_nothing(tmp_path: Path) -> None:
    from flowforge.checkpoint import model_manifest, save_checkpoint

    model = RealNVP(2, transforms=2, hidden=(8,))
    with pytest.raises(TypeError, match=r"tensor_files\['extra'\]\['x'\] must be a torch\.Tensor, got int"):
        save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "extra": {"x": 1}}, model_manifest(model))
    assert not (tmp_path / "run").exists()


def test_an_edited_manifest_is_refused_before_its_model_is_built(tmp_path: Path) -> None:
    save_model(tmp_path, RealNVP(2, transforms=2, hidden=(8,)))
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    manifest["model"]["arguments"]["hidden"] = [2**62]  # built first, this would ask for exabytes
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="edited"):
        load_model(tmp_path)
