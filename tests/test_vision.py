"""Policies from pixels: training-only augmentation, the keypoint encoder, several cameras, the robot's
own state with the previous frame and the goal, the uint8 frame cache and validated settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowforge.data.episodes import EpisodeDataset
from flowforge.data.feature_stats import image_stats
from flowforge.data.frame_cache import EncodedFrames, FrameCache, MemoryFrames
from flowforge.errors import ConfigError, DataError
from flowforge.policy import ChunkExecutor, ChunkPolicy, PolicyConfig
from flowforge.policy.core import state_statistics
from flowforge.policy.data import PolicyWindows, policy_tensors
from flowforge.policy.vision import ImageAugmentation, KeypointImageEncoder, SpatialSoftmax, image_statistics

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_v3" / "split"  # 3 episodes, cameras wrist (png) and top (mp4)
SIZE = 40


def _policy(seed: int = 0, **changes) -> ChunkPolicy:
    settings = dict(
        state_key="observation.state",
        state_dim=4,
        action_dim=2,
        horizon=4,
        obs_horizon=2,
        width=16,
        layers=1,
        heads=2,
        image_shape=[3, SIZE, SIZE],
        language=False,
        sampling_steps=2,
        cameras=["corner", "gripperPOV"],
        image_encoder="resnet-keypoints",
        keypoints=4,
        image_channels=[4, 8],
        augmentation="shift",
        augmentation_pixels=3,
        color_jitter=0.3,
    )
    settings.update(changes)
    torch.manual_seed(seed)
    return ChunkPolicy(PolicyConfig(**settings))


def _batch(policy: ChunkPolicy, rows: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = policy.policy_config
    batch = {
        "state": torch.randn(rows, cfg.obs_horizon, cfg.state_dim, generator=g),
        "action": torch.rand(rows, cfg.horizon, cfg.action_dim, generator=g) * 2 - 1,
        "action_is_pad": torch.zeros(rows, cfg.horizon, dtype=torch.bool),
    }
    for key in cfg.image_keys:
        shape = (rows, cfg.obs_horizon, *cfg.image_shape)
        batch[key] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return batch


# ---------------------------------------------------------------- augmentation
def test_augmentation_is_never_applied_in_evaluation() -> None:
    for augmentation in ("shift", "crop"):
        policy = _policy(augmentation=augmentation)
        batch = _batch(policy)
        noise = torch.randn(3, 4, 2)
        for mode in (False, True):  # predict_chunk never augments, even on a policy left in training mode
            policy.train(mode)
            first = policy.predict_chunk(batch, noise=noise).actions
            second = policy.predict_chunk(batch, noise=noise).actions
            torch.testing.assert_close(first, second, rtol=0, atol=0)
        policy.eval()
        torch.testing.assert_close(policy.prefix(batch), policy.prefix(batch), rtol=0, atol=0)
        policy.train()  # training: two passes over the same batch see different images
        assert not torch.equal(policy.prefix(batch), policy.prefix(batch))
        assert not torch.equal(policy.prefix(batch), policy.prefix(batch, augment=False))


def test_augmentation_shapes_bounds_and_shared_draws() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    windows = images.repeat_interleave(2, dim=0)  # 4 windows of 2 identical frames
    shift = ImageAugmentation("shift", pixels=3).train()
    shifted = shift.geometric(windows, frames=2)
    assert shifted.shape == windows.shape and shifted.dtype == torch.uint8
    assert torch.equal(shifted[0::2], shifted[1::2])  # the frames of a window move together
    assert not torch.equal(shifted, windows)
    for moved, original in zip(shifted[0::2], images, strict=True):  # a shift of the image, border repeated
        matches = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                rows = (torch.arange(20) + dy).clamp(0, 19)
                cols = (torch.arange(24) + dx).clamp(0, 23)
                matches.append(torch.equal(moved, original[:, rows][:, :, cols]))
        assert any(matches)
    assert torch.equal(shift.eval().geometric(windows, frames=2), windows)
    crop = ImageAugmentation("crop", pixels=3).train()
    cropped = crop.geometric(images)
    assert cropped.shape == (4, 3, 14, 18) and crop.output_size(20, 24) == (14, 18)
    assert torch.equal(crop.eval().geometric(images), images[:, :, 3:17, 3:21])  # the centre in evaluation
    jitter = ImageAugmentation("none", color_jitter=0.4).train()
    colored = jitter(windows, frames=2)
    assert colored.dtype == torch.float32 and colored.min() >= 0 and colored.max() <= 1
    assert torch.equal(colored[0::2], colored[1::2]) and not torch.allclose(colored, windows / 255.0)
    torch.testing.assert_close(jitter.eval()(windows), windows / 255.0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="augmentation 'flip' is not one of none, shift, crop"):
        ImageAugmentation("flip")


def test_image_statistics_are_computed_on_what_evaluation_sees() -> None:
    frames = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    frames[:, :, :4] = 0  # a dark border the centre crop leaves out
    crop = ImageAugmentation("crop", pixels=4)
    stats = image_statistics(frames, crop)
    expected = image_stats(frames[:, :, 4:16, 4:16].permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(stats["mean"], expected["mean"])
    policy = _policy(image_normalization="mean_std", augmentation="crop", augmentation_pixels=2)
    policy.set_image_statistics([stats, stats])
    torch.testing.assert_close(policy.encoder.image_mean[1].flatten(), torch.tensor(stats["mean"]).flatten().float())


# ---------------------------------------------------------------- encoders and cameras
def test_spatial_softmax_finds_the_peak_of_one_hot_maps() -> None:
    maps = torch.zeros(2, 3, 5, 7)
    peaks = [[(0, 0), (4, 6), (2, 3)], [(1, 5), (3, 1), (4, 0)]]
    for n, row in enumerate(peaks):
        for k, (i, j) in enumerate(row):
            maps[n, k, i, j] = 1e4
    keypoints = SpatialSoftmax()(maps)
    x, y = torch.linspace(-1, 1, 7), torch.linspace(-1, 1, 5)
    expected = torch.tensor([[[x[j], y[i]] for i, j in row] for row in peaks])
    torch.testing.assert_close(keypoints, expected)
    flat = SpatialSoftmax()(torch.zeros(1, 1, 4, 4))  # no peak: the centre of the image
    torch.testing.assert_close(flat, torch.zeros(1, 1, 2))
    encoder = KeypointImageEncoder([3, 32, 32], width=8, keypoints=5, channels=(4, 8, 8))
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 5, 8) and encoder.grid == (2, 2)


@pytest.mark.parametrize("image_encoder", ["conv", "resnet-keypoints"])
def test_each_cameras_tokens_reach_the_expert(image_encoder: str) -> None:
    keypoint_settings = {} if image_encoder == "resnet-keypoints" else {"keypoints": 32, "image_channels": [16, 32, 64]}
    policy = _policy(image_encoder=image_encoder, **keypoint_settings).train()  # conv: the defaults, unread
    batch = _batch(policy)
    for key in policy.policy_config.image_keys:  # pixel values as floats, so that they have a gradient
        batch[key] = batch[key].float().requires_grad_()
    policy.loss(batch).backward()
    for key in policy.policy_config.image_keys:
        assert batch[key].grad is not None and batch[key].grad.abs().sum() > 0, key
    for camera, encoder in enumerate(policy.encoder.image_encoders):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters()), camera
    per_frame = policy.encoder.image_encoders[0].tokens
    assert policy.encoder.tokens == 2 * (1 + 2 * per_frame)  # state + two cameras' groups per frame


def test_a_policy_refuses_the_images_of_another_camera() -> None:
    policy = _policy(cameras=["corner"], color_jitter=0.0).eval()
    batch = _batch(policy)
    other = {**batch, "image.gripperPOV": batch.pop("image.corner")}
    with pytest.raises(ValueError, match=r"images of another camera, 'image\.gripperPOV'.*cameras corner"):
        policy.predict_chunk(other)
    plain = {**batch, "image": other["image.gripperPOV"]}  # the one camera's images under the plain key
    assert policy.predict_chunk(plain).actions.shape == (3, 4, 2)
    two = _policy().eval()
    with pytest.raises(ValueError, match=r"no 'image\.gripperPOV'.*cameras corner, gripperPOV"):
        two.predict_chunk({k: v for k, v in _batch(two).items() if k != "image.gripperPOV"})
    with pytest.raises(ValueError, match=r"images of another camera, 'image'.*cameras corner, gripperPOV"):
        two.predict_chunk({**_batch(two), "image": torch.zeros(5)})  # an unnamed camera beside the named ones
    with pytest.raises(ValueError, match=r"images of another camera, 'image'"):
        images = other["image.gripperPOV"]
        policy.predict_chunk({**batch, "image.corner": images, "image": images})  # the one camera given twice
    executor = ChunkExecutor(policy)
    frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    observation = {"state": np.zeros(4, dtype=np.float32), "image.gripperPOV": frame}
    with pytest.raises(ValueError, match=r"no 'image\.corner'.*trained on the cameras corner.*image\.gripperPOV"):
        executor.act(observation)
    assert executor.act({**observation, "image.corner": frame}).shape == (2,)


# ---------------------------------------------------------------- the robot's state, its previous frame, the goal
def test_previous_state_and_goal_agree_between_data_and_executor() -> None:
    dataset = EpisodeDataset(FIXTURE, obs_horizon=2, action_horizon=4)
    config = PolicyConfig(
        state_key="observation.state", state_dim=8, action_dim=2, horizon=4, obs_horizon=2, width=16, layers=1,
        heads=2, language=False, previous_state=True,
    )  # fmt: skip
    tensors, _ = policy_tensors(dataset, progress=False, config=config)
    states = np.asarray(dataset.episode_columns(0)["observation.state"], dtype=np.float32)
    policy = ChunkPolicy(config).eval()
    executor = ChunkExecutor(policy)
    for frame, state in enumerate(states):
        window = executor.batch({"state": state})["state"][0]
        torch.testing.assert_close(window, tensors["state"][frame], rtol=0, atol=0)
    first = tensors["state"][0, -1]
    torch.testing.assert_close(first[:4], first[4:])  # the first frame is its own previous frame
    goal = PolicyConfig(state_dim=7, goal_key="observation.goal", language=False, state_key="observation.state")
    executor = ChunkExecutor(ChunkPolicy(goal).eval())
    environment_state = np.arange(39, dtype=np.float32)
    batch = executor.batch({"state": np.zeros(4, np.float32), "environment_state": environment_state})
    assert batch["state"][0, -1, 4:].tolist() == [36.0, 37.0, 38.0]  # MetaWorld's goal position
    stats = {
        "observation.state": {"mean": [1.0] * 4, "std": [2.0] * 4, "min": [0.0] * 4, "max": [3.0] * 4},
        "observation.environment_state": {k: list(range(39)) for k in ("mean", "std", "min", "max")},
    }
    combined = state_statistics(stats, goal)
    assert list(combined["mean"]) == [1.0] * 4 + [36.0, 37.0, 38.0]
    with pytest.raises(DataError, match=r"no 'observation\.goal' entry"):
        state_statistics({"observation.state": stats["observation.state"]}, goal)


# ---------------------------------------------------------------- frames that keep up
def test_the_frame_cache_round_trips_every_frame_and_resumes(tmp_path: Path, monkeypatch) -> None:
    dataset = EpisodeDataset(FIXTURE)
    expected = {
        key: torch.cat([dataset.camera_frames(e, key) for e in range(len(dataset.lengths))])
        for key in dataset.camera_keys
    }
    decoded = []
    real = EpisodeDataset.camera_frames

    def interrupted(self, episode, key, frames=None):
        if len(decoded) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the third episode
        decoded.append(episode)
        return real(self, episode, key, frames)

    key = "observation.images.top"  # the video camera
    monkeypatch.setattr(EpisodeDataset, "camera_frames", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FrameCache.build(dataset, key, tmp_path)
    with pytest.raises(DataError, match=r"incomplete \(2 of 3 episodes\)"):
        FrameCache(tmp_path, key)
    monkeypatch.setattr(EpisodeDataset, "camera_frames", real)
    resumed = []
    monkeypatch.setattr(EpisodeDataset, "camera_frames", lambda s, e, k, f=None: resumed.append(e) or real(s, e, k, f))
    cache = FrameCache.build(dataset, key, tmp_path)
    assert resumed == [2]  # only the episode that was not finished
    assert torch.equal(cache.take(range(len(cache))), expected[key])
    assert FrameCache.build(dataset, key, tmp_path).take([4, 0]).equal(expected[key][[4, 0]]) and resumed == [2]
    monkeypatch.setattr(EpisodeDataset, "camera_frames", real)
    wrist = "observation.images.wrist"
    for source in (
        FrameCache.build(dataset, wrist, tmp_path),
        EncodedFrames.from_dataset(dataset, wrist),
        MemoryFrames.from_dataset(dataset, wrist),
    ):
        assert torch.equal(source.take([8, 3, 3, 0]), expected[wrist][[8, 3, 3, 0]])
        for wrong in ([-1], [len(source)], [1.7]):  # never the last frame, an error or frame 1 instead
            with pytest.raises(IndexError, match=rf"frame index .*expected integers in \[0, {len(source) - 1}\]"):
                source.take(wrong)
    assert dataset.camera_frames(0, wrist, []).shape == (0, *expected[wrist].shape[1:])
    with pytest.raises(IndexError, match=r"index tensor\(3\): expected an int in 0\.\."):
        dataset[torch.tensor(3)]
    with pytest.raises(DataError, match="is a video"):
        EncodedFrames.from_dataset(dataset, key)
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    with pytest.raises(DataError, match="caches another data set"):
        FrameCache.build(EpisodeDataset(other), key, tmp_path)


def test_a_frame_cache_of_a_data_set_collected_again_in_its_folder_is_refused(tmp_path: Path) -> None:
    """Same folder, same episode lengths, other frames (collected again with another seed): the
    episodes' recorded pixel statistics tell the cache apart; a grown data set still extends it."""
    key = "observation.images.wrist"
    dataset = EpisodeDataset(FIXTURE)
    FrameCache.build(dataset, key, tmp_path)
    grown = EpisodeDataset(FIXTURE)
    grown.lengths = grown.lengths[:2]  # the cache of the first two episodes, extended by the third below
    grown.episodes = grown.episodes[:2]
    shutil.rmtree(tmp_path / key)
    FrameCache.build(grown, key, tmp_path)
    assert len(FrameCache.build(dataset, key, tmp_path)) == sum(dataset.lengths)
    again = EpisodeDataset(FIXTURE)
    stats = f"stats/{key}/mean"
    again.episodes[1] = {**again.episodes[1], stats: np.asarray(again.episodes[1][stats]) + 0.01}
    with pytest.raises(DataError, match=r"caches another data set \(its episode_stats differ"):
        FrameCache.build(again, key, tmp_path)


def test_a_frame_cache_cut_short_is_refused_then_rebuilt_whole(tmp_path: Path) -> None:
    """Mapping a short array read-write would pad it with black frames; it is refused on open and
    decoded again by the next build."""
    import os

    dataset = EpisodeDataset(FIXTURE)
    key = "observation.images.wrist"
    expected = torch.cat([dataset.camera_frames(e, key) for e in range(len(dataset.lengths))])
    FrameCache.build(dataset, key, tmp_path)
    frames = tmp_path / key / "frames.npy"
    os.truncate(frames, frames.stat().st_size // 2)
    with pytest.raises(DataError, match=r"frames\.npy is \d+ bytes, expected \d+ \(truncated or overwritten\)"):
        FrameCache(tmp_path, key)
    assert torch.equal(FrameCache.build(dataset, key, tmp_path).take(range(len(expected))), expected)


def test_the_frame_cache_grows_with_a_data_set_that_gained_episodes(tmp_path: Path, monkeypatch) -> None:
    """A resumed collection appends episodes: the cache keeps what it decoded and decodes the rest,
    also when a kill left the grown array under the old record."""
    import json

    dataset = EpisodeDataset(FIXTURE)
    key = "observation.images.wrist"
    expected = FrameCache.build(dataset, key, tmp_path).take(range(int(sum(dataset.lengths))))
    where = tmp_path / key
    record = json.loads((where / "progress.json").read_text())
    two = int(sum(dataset.lengths[:2]))
    real, decoded = EpisodeDataset.camera_frames, []

    def counting(self, episode, feature, frames=None):
        decoded.append(episode)
        return real(self, episode, feature, frames)

    for grown_already in (False, True):
        earlier = {**record, "episodes": 2, "source": {**record["source"], "lengths": record["source"]["lengths"][:2]}}
        (where / "progress.json").write_text(json.dumps(earlier))  # the cache of the set before its third episode
        if not grown_already:
            np.save(where / "frames.npy", expected[:two].numpy())
        decoded.clear()
        monkeypatch.setattr(EpisodeDataset, "camera_frames", counting)
        cache = FrameCache.build(dataset, key, tmp_path)
        monkeypatch.setattr(EpisodeDataset, "camera_frames", real)
        assert decoded == [2] and torch.equal(cache.take(range(len(cache))), expected)
        assert json.loads((where / "progress.json").read_text()) == record
        assert not list(where.glob("*.growing.npy"))


def test_a_second_builder_of_one_frame_cache_waits_for_the_first(tmp_path: Path) -> None:
    """Two runs started together on one data set build its cache in turn: one truncating the array
    while the other reads it would hand training frames of zeros."""
    import subprocess
    import sys
    import time

    from flowforge.utils.locks import exclusive_lock

    key = "observation.images.wrist"
    where = tmp_path / key
    where.mkdir()
    code = (
        "import sys; from flowforge.data.episodes import EpisodeDataset; "
        "from flowforge.data.frame_cache import FrameCache; print('building', flush=True); "
        "FrameCache.build(EpisodeDataset(sys.argv[1]), sys.argv[2], sys.argv[3])"
    )
    with exclusive_lock(where / ".lock"):  # the first builder, still at work
        builder = subprocess.Popen(
            [sys.executable, "-c", code, str(FIXTURE), key, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert builder.stdout.readline() == "building\n"  # imports done: the build is what is left
        time.sleep(1.5)
        assert builder.poll() is None and not (where / "progress.json").exists()
    assert builder.wait(timeout=60) == 0
    dataset = EpisodeDataset(FIXTURE)
    expected = torch.cat([dataset.camera_frames(e, key) for e in range(len(dataset.lengths))])
    assert torch.equal(FrameCache(tmp_path, key).take(range(len(expected))), expected)


def test_two_camera_windows_train_the_same_with_and_without_workers(tmp_path: Path) -> None:
    from flowforge.runs.policy import prepare_policy
    from flowforge.train import PolicyObjective, Trainer, TrainerConfig

    dataset = EpisodeDataset(FIXTURE, obs_horizon=2, action_horizon=4)
    config = PolicyConfig(
        state_key="observation.state", horizon=4, obs_horizon=2, width=16, layers=1, heads=2, language=False,
        image_shape=[3, 32, 32], cameras=["wrist", "top"], image_encoder="resnet-keypoints", keypoints=4,
        image_channels=[4, 8], augmentation="crop", augmentation_pixels=2, image_normalization="mean_std",
        previous_state=True,
    )  # fmt: skip
    tensors, _ = policy_tensors(dataset, progress=False, config=config)
    losses = []
    for frames, workers in (("tensors", 0), ("memory", 0), ("cache", 1)):
        torch.manual_seed(0)
        policy, data = prepare_policy(config, dataset, progress=False, frames=frames, cache=tmp_path / "cache")
        assert policy.policy_config.image_shape == [3, 32, 32] and policy.policy_config.state_dim == 8
        if isinstance(data, PolicyWindows):
            batch, _ = data.__getitems__([5, 0, 7])
            for key in ("state", "action", "image.wrist", "image.top"):
                assert torch.equal(batch[key], tensors[key][[5, 0, 7]]), key
        settings = TrainerConfig(steps=3, batch_size=4, warmup_steps=0, log_every=1, progress=False)
        state = Trainer(policy, PolicyObjective(), settings, data=data, workers=workers).fit()
        losses.append([entry["loss"] for entry in state.history])
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 3


def test_decoding_in_workers_gives_the_batches_of_the_main_process(tmp_path: Path) -> None:
    from flowforge.policy.data import policy_windows
    from flowforge.train.distributed import ShardedBatches

    dataset = EpisodeDataset(FIXTURE, obs_horizon=2, action_horizon=4)
    config = PolicyConfig(
        state_key="observation.state", horizon=4, obs_horizon=2, language=False, image_shape=[3, 32, 32],
        cameras=["wrist"], image_encoder="resnet-keypoints",
    )  # fmt: skip
    windows, _ = policy_windows(dataset, config, "decode", progress=False)
    batches = [ShardedBatches(windows, None, 4, seed=3, workers=workers) for workers in (0, 1)]
    for _ in range(3):
        (first, _), (second, _) = (b.next() for b in batches)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------- settings refused with their names
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_encoder": "vit"}, r"image_encoder = 'vit' is not one of conv, resnet-keypoints"),
        ({"image_shape": [3, 32, 32], "image_encoder": "conv"}, r"'conv' needs at least 36x36 pixels"),
        (
            {"image_shape": [3, 40, 40], "image_encoder": "conv", "augmentation": "crop"},
            r"image_shape = \[3, 40, 40\]: image_encoder = 'conv' needs at least 36x36 pixels after "
            r"augmentation = 'crop' removes 6 pixels from each side's length",
        ),
        ({"image_shape": [3, 12, 12], "image_channels": [4, 8, 8]}, r"'resnet-keypoints' needs at least 17x17"),
        ({"augmentation": "flip"}, r"augmentation = 'flip' is not one of none, shift, crop"),
        (
            {"image_shape": [3, 32, 32], "augmentation": "shift", "augmentation_pixels": 16},
            r"augmentation_pixels = 16: a shift moves the image by less than half its side; expected at most 15",
        ),
        ({"color_jitter": 1.5}, r"color_jitter = 1.5: expected a finite number >= 0 and < 1"),
        ({"cameras": ["corner", "corner"]}, r"cameras = \['corner', 'corner'\]: a camera is named twice"),
        ({"cameras": ["left.eye"]}, r"cameras: 'left.eye' is not a camera name"),
        ({"cameras": ["corner"], "image_shape": None}, r"cameras = \['corner'\]: set image_shape"),
        ({"goal_key": "observation.target"}, r"goal_key = 'observation.target' is not one of observation.goal"),
        ({"image_normalization": "batch"}, r"image_normalization = 'batch' is not one of fixed, mean_std"),
        ({"keypoints": 0}, r"keypoints = 0: expected an integer in \[1, 1024\]"),
        ({"image_channels": [8, 0]}, r"image_channels\[1\] = 0: expected an integer in \[1, 16384\]"),
    ],
)
def test_bad_vision_settings_are_refused_naming_them(changes: dict, message: str) -> None:
    settings = {"image_shape": [3, 84, 84], "image_encoder": "resnet-keypoints", "augmentation_pixels": 3, **changes}
    with pytest.raises(ConfigError, match=message):
        PolicyConfig(**settings)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cameras": ["corner"]}, r"cameras: 'corner' is not a camera of .*; its cameras: wrist, top"),
        ({"state_key": "observation.environment_state"}, r"state_key = 'observation.environment_state': .* no such"),
        ({"goal_key": "observation.goal"}, r"goal_key = 'observation.goal': .* nor 'observation.environment_state'"),
        ({"image_encoder": "conv"}, r"image_shape = \[3, 32, 32\]: image_encoder = 'conv' needs at least 36x36"),
        (
            {"image_shape": [3, 84, 84]},
            r"image_shape = \[3, 84, 84\]: the data's observation.images.wrist frames are \[3, 32, 32\]; "
            r"set image_shape = \[3, 32, 32\]",
        ),
    ],
)
def test_a_mode_or_camera_the_data_set_lacks_is_refused(changes: dict, message: str, tmp_path: Path) -> None:
    from flowforge.runs.policy import prepare_policy

    dataset = EpisodeDataset(FIXTURE, obs_horizon=1, action_horizon=4)
    settings = {
        "state_key": "observation.state",
        "language": False,
        "image_shape": [3, 32, 32],
        "cameras": ["wrist"],
        "image_encoder": "resnet-keypoints",
        **changes,
    }
    with pytest.raises(ConfigError, match=message):
        prepare_policy(PolicyConfig(**settings), dataset, progress=False, frames="cache", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before a frame was decoded or cached


def test_the_data_tables_frame_settings_are_checked() -> None:
    from flowforge.runs.policy import load_policy_config, parse_policy_config

    images = "[policy]\nimage_shape = [3, 84, 84]\n"
    run = parse_policy_config('[data]\nroot = "data/x"\nframes = "cache"\nworkers = 2\n' + images)
    assert run.data.cache_folder() == Path("data/x.frames").resolve() and run.data.workers == 2  # kept absolute
    # A policy without cameras reads no frames: settings of how frames are read are refused for it.
    for setting in ('frames = "cache"', 'cache = "c"\nframes = "cache"', 'frames = "memory"\nworkers = 1'):
        with pytest.raises(ConfigError, match=r"this policy reads no camera frames \(policy.image_shape is not set\)"):
            parse_policy_config(f'[data]\nroot = "x"\n{setting}\n')
    with pytest.raises(ConfigError, match=r"cache = 'c': only frames = 'cache' reads a frame cache"):
        parse_policy_config('[data]\nroot = "x"\ncache = "c"\nframes = "memory"\n' + images)
    with pytest.raises(ConfigError, match=r"frames = 'disk' is not one of tensors, memory, cache, decode"):
        parse_policy_config('[data]\nroot = "x"\nframes = "disk"\n')
    with pytest.raises(ConfigError, match=r"workers = 2: frames = 'tensors' are indexed in memory"):
        parse_policy_config('[data]\nroot = "x"\nworkers = 2\n')
    shipped = load_policy_config(Path(__file__).parents[1] / "configs" / "policy" / "mt10_images.toml")
    policy = shipped.policy
    assert policy.cameras == ["corner", "gripperPOV"] and policy.state_key == "observation.state"
    assert policy.image_encoder == "resnet-keypoints" and policy.goal_key == "observation.goal"


def test_an_unknown_metaworld_camera_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from flowforge.envs.metaworld import CAMERAS, check_cameras

    assert check_cameras(["corner", "gripperPOV"]) == ["corner", "gripperPOV"]
    with pytest.raises(ValueError, match=r"unknown MetaWorld camera 'side'; the cameras are: topview, corner"):
        check_cameras(["corner", "side"])
    assert "gripperPOV" in CAMERAS
    pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")
    from flowforge.envs.collect import collect

    with pytest.raises(ValueError, match="unknown MetaWorld camera 'side'"):
        collect(["reach-v3"], 1, tmp_path / "out", images=True, cameras=["corner", "side"], progress=False)
    assert not (tmp_path / "out").exists()


def test_a_frame_cache_under_a_file_is_refused_naming_the_setting(tmp_path: Path) -> None:
    from flowforge.runs.policy import PolicyDataConfig

    (tmp_path / "afile").write_text("not a folder")
    for cache in ("afile", "afile/inside"):
        config = PolicyDataConfig(root=str(tmp_path / "data"), frames="cache", cache=str(tmp_path / cache))
        with pytest.raises(ConfigError, match=r"\[data\] cache = .* is a file or lies under one"):
            config.cache_folder()
    data_set, run = tmp_path / "set", tmp_path / "run"
    (data_set / "meta").mkdir(parents=True)
    (data_set / "meta" / "info.json").write_text("{}")
    run.mkdir()
    (run / "checkpoint.json").write_text("{}")
    for cache, holder in ((data_set / "cache", "episode data set"), (data_set, "episode data set"), (run, "run")):
        config = PolicyDataConfig(root=str(tmp_path / "data"), frames="cache", cache=str(cache))
        with pytest.raises(ConfigError, match=rf"\[data\] cache = .*: lies inside the {holder} "):
            config.cache_folder()  # a collection rewrites a data set's folders; a run's are its own
    beside = PolicyDataConfig(root=str(tmp_path / "afile" / "data"), frames="cache")
    with pytest.raises(ConfigError, match=r"the frame cache beside root"):
        beside.cache_folder()
    assert PolicyDataConfig(root=str(tmp_path / "data"), frames="cache").cache_folder() == tmp_path / "data.frames"
    with pytest.MonkeyPatch.context() as patch:  # a run started inside its data set (root = ".")
        (tmp_path / "data").mkdir()
        patch.chdir(tmp_path / "data")
        assert PolicyDataConfig(root=".", frames="cache").cache_folder() == (tmp_path / "data.frames").resolve()


def test_a_mismatched_start_or_resume_is_refused_before_a_frame_cache_is_made(tmp_path: Path) -> None:
    """A run that starts from (or resumes) a trained policy with other settings is refused before
    the data set's frames are decoded into a cache: nothing is written."""
    from flowforge.errors import CheckpointError
    from flowforge.runs.policy import check_resume_tables, parse_policy_config, train_policy

    def config(cache: Path, width: int = 16) -> str:
        return (
            f'[policy]\nstate_key = "observation.state"\nhorizon = 4\nwidth = {width}\nlayers = 1\nheads = 2\n'
            'language = false\nimage_shape = [3, 32, 32]\ncameras = ["wrist"]\nimage_encoder = "resnet-keypoints"\n'
            f'keypoints = 4\nimage_channels = [4, 8]\n[data]\nroot = "{FIXTURE}"\nframes = "cache"\n'
            f'cache = "{cache}"\n[train]\nsteps = 2\nbatch_size = 4\nwarmup_steps = 0\nprogress = false\n'
        )

    base = tmp_path / "base"
    train_policy(parse_policy_config(config(tmp_path / "base-cache")), base)
    assert (tmp_path / "base-cache").is_dir()
    wider = parse_policy_config(config(tmp_path / "new-cache", width=32))
    with pytest.raises(
        ConfigError, match=r"start_from = .*: its policy differs from this run's: width = 32 \(trained 16\)"
    ):
        train_policy(wider, tmp_path / "tuned", start_from=base)
    assert not (tmp_path / "new-cache").exists() and not (tmp_path / "tuned").exists()
    shutil.rmtree(tmp_path / "base-cache")
    resumed = parse_policy_config(config(tmp_path / "base-cache", width=32))
    with pytest.raises(CheckpointError, match=r"cannot resume .*\(policy\.width: 16 -> 32\)"):
        check_resume_tables(resumed, base)
    assert not (tmp_path / "base-cache").exists()
    check_resume_tables(parse_policy_config(config(tmp_path / "base-cache")), base)  # the same settings resume
