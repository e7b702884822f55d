"""Checkpoints: round trips for every recipe, atomic replacement, clear errors, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowforge.checkpoint import (
    CheckpointError,
    decode_state,
    encode_state,
    load_tensors,
    read_manifest,
    save_checkpoint,
)
from flowforge.flows import CNF, IAF, MAF, NICE, NSF, Flow, RealNVP

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
    with pytest.raises(CheckpointError, match="do not fit"):
        Flow.load(tmp_path / "realnvp")


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
