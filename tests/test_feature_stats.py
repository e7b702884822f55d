"""Per-episode statistics and their aggregation (LeRobot v3.0's stats), and what collection writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowforge.data.feature_stats import STATISTICS, aggregate_stats, feature_stats, image_stats


def test_aggregated_mean_std_min_max_equal_those_of_all_frames() -> None:
    rng = np.random.default_rng(0)
    episodes = [rng.normal(i, 1 + i, size=(n, 3)) for i, n in enumerate((7, 30, 12))]
    merged = aggregate_stats([feature_stats(e) for e in episodes])
    frames = np.concatenate(episodes)
    np.testing.assert_allclose(merged["mean"], frames.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged["std"], frames.std(0), rtol=1e-12)
    np.testing.assert_array_equal(merged["min"], frames.min(0))
    np.testing.assert_array_equal(merged["max"], frames.max(0))
    assert merged["count"] == [49] and set(merged) == set(STATISTICS)
    # Quantiles are the count-weighted mean of the episodes' (LeRobot's rule): exact for one episode.
    weighted = sum(len(e) * np.quantile(e, 0.9, axis=0) for e in episodes) / 49
    np.testing.assert_allclose(merged["q90"], weighted, rtol=1e-12)
    one = aggregate_stats([feature_stats(episodes[0])])
    np.testing.assert_allclose(one["q50"], np.median(episodes[0], axis=0), rtol=1e-12)


def test_image_statistics_are_per_channel_in_zero_one() -> None:
    frames = np.zeros((4, 5, 5, 3), dtype=np.uint8)
    frames[..., 0] = 255
    frames[..., 2] = np.arange(4)[:, None, None] * 85  # 0, 85, 170, 255
    stats = image_stats(frames)
    assert np.asarray(stats["mean"]).shape == (3, 1, 1) and stats["count"] == [4]
    np.testing.assert_allclose(np.asarray(stats["mean"]).ravel(), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(np.asarray(stats["max"]).ravel(), [1.0, 0.0, 1.0])
    merged = aggregate_stats([stats, image_stats(frames[:2])])
    assert np.asarray(merged["q99"]).shape == (3, 1, 1) and merged["count"] == [6]


def test_statistics_refuse_what_would_make_them_nan_or_wrong() -> None:
    values = np.zeros((3, 2))
    values[1, 1] = np.nan
    with pytest.raises(ValueError, match="values hold nan at frame 1, dimension 1"):
        feature_stats(values)
    with pytest.raises(ValueError, match=r"at least one frame, got shape \(0, 2\)"):
        feature_stats(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"frames must be uint8 pixels .* got float32"):
        image_stats(np.full((2, 4, 4, 3), 0.5, np.float32))  # already in [0, 1]: would be divided by 255 again
    empty = {**feature_stats(np.zeros((2, 1))), "count": [0]}
    with pytest.raises(ValueError, match=r"counts must be >= 0 with a positive total, got \[0.0\]"):
        aggregate_stats([empty])


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")
    from flowforge.envs.collect import collect

    root = tmp_path_factory.mktemp("collected")
    collect(["reach-v3", "push-v3"], 1, root, images=True, size=36, progress=False)
    return root


def test_a_collected_folder_carries_lerobot_v3_metadata(collected: Path) -> None:
    import pyarrow.parquet as parquet

    info = json.loads((collected / "meta" / "info.json").read_text())
    features = info["features"]
    assert features["observation.state"]["shape"] == [4] and features["observation.environment_state"]["shape"] == [39]
    stats = json.loads((collected / "meta" / "stats.json").read_text())
    assert set(stats) == set(features)  # every feature, images included
    for key, entry in stats.items():
        assert set(entry) == set(STATISTICS), key
    assert np.asarray(stats["observation.images.corner"]["q50"]).shape == (3, 1, 1)
    episodes = parquet.read_table(collected / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pydict()
    assert episodes["data/file_index"] == [0, 1] and episodes["meta/episodes/file_index"] == [0, 0]
    assert episodes["stats/action/count"] == [[length] for length in episodes["length"]]
    total = sum(episodes["length"])
    assert stats["action"]["count"] == [total] and stats["observation.environment_state"]["count"] == [total]
    # The data set's statistics are the aggregate of the episodes' columns.
    merged = aggregate_stats([{name: episodes[f"stats/action/{name}"][i] for name in STATISTICS} for i in range(2)])
    np.testing.assert_allclose(merged["std"], stats["action"]["std"])
    tasks = parquet.read_table(collected / "meta" / "tasks.parquet")
    assert tasks.column("task").to_pylist() == ["reach the goal position", "push the puck to the goal"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # a pandas index, as lerobot's
