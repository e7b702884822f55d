"""Camera frames of an episode data set that keep up with training: a decoded uint8 cache on disk,
or the encoded images decoded per batch.

Decoding PNG files is what bounds an image policy's training on a CPU (an 84x84 frame takes about
0.1 ms to decode; a batch of 64 windows of two frames from two cameras is 256 of them), and
holding every window decoded in memory does not scale to many cameras and frames. Two sources of
frames, both read by global frame index (the data set's row) a batch at a time:

* :class:`FrameCache`: every frame of one camera feature (image or video) decoded once, in episode
  order, into ``<folder>/<feature>/frames.npy``, a ``(frames, 3, H, W)`` uint8 array in NumPy's
  ``.npy`` format, read memory-mapped (the operating system keeps the pages it reads in its cache;
  84x84 RGB is 21 KB a frame, 1.3 GB for 60,000 frames). ``progress.json`` beside it records the
  data set it was built from (folder, episode lengths, frame shape) and how many episodes are
  decoded, with a digest of each episode's recorded pixel statistics (a data set collected again
  into the same folder is told apart); it is replaced atomically after each episode, so an
  interrupted build resumes from there. A data set that gained episodes (a resumed collection)
  grows its cache, keeping the frames already decoded; a cache of another data set is refused,
  never mixed. Two processes that build one
  cache at once (two runs started together on one data set) take turns through a file lock.
* :class:`EncodedFrames`: the PNG files of an image feature, held in memory as one byte buffer with
  offsets (no Python object per frame, so worker processes forked from the trainer share it), and
  decoded when a batch asks for them: in ``torch.utils.data.DataLoader`` worker processes, the
  decoding runs beside training.

A third, :class:`MemoryFrames`, decodes every frame into memory once (one copy per frame, not per
window). All three have ``take(index) -> (len(index), 3, H, W)`` uint8 and pickle cheaply::

    cache = FrameCache.build(EpisodeDataset("data/mt10"), "observation.images.corner", "data/mt10.frames")
    cache.take([0, 5])  # two frames, read from the memory-mapped file
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowforge.data.episodes import EpisodeDataset, decode_png, image_shape
from flowforge.errors import DataError
from flowforge.utils.locks import exclusive_lock

CACHE_FORMAT = "flowforge-frame-cache"
CACHE_VERSION = 1


def _source(dataset: EpisodeDataset, key: str) -> dict[str, Any]:
    """What a cache of ``key`` must agree with to belong to ``dataset``."""
    feature = dataset.features.get(key)
    if feature is None or feature.get("dtype") not in ("image", "video"):
        cameras = ", ".join(dataset.camera_keys) or "none"
        raise DataError(f"{dataset.root}: {key!r} is not a camera feature; its cameras: {cameras}")
    height, width, channels = image_shape(feature)
    return {
        "root": str(Path(dataset.root).resolve()),
        "feature": key,
        "shape": [channels, height, width],
        "lengths": [int(n) for n in dataset.lengths],
        "episode_stats": [_episode_fingerprint(episode, key) for episode in dataset.episodes],
    }


def _episode_fingerprint(episode: dict[str, Any], key: str) -> str:
    """A digest of the camera's statistics that the data set records for one episode (means,
    deviations, extremes of its pixels): a data set collected again with other frames in an
    episode of the same length gives another one. Empty where the data set records none."""
    prefix = f"stats/{key}/"
    stats = {name: np.asarray(value).tolist() for name, value in sorted(episode.items()) if name.startswith(prefix)}
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16] if stats else ""


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` atomically (temporary file, flush, rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(value) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _extends(cached: Any, source: dict[str, Any]) -> bool:
    """Whether ``source`` is the cached data set with episodes appended (a resumed collection)."""
    if not isinstance(cached, dict) or not isinstance(cached.get("lengths"), list):
        return False
    same = all(cached.get(key) == source[key] for key in ("root", "feature", "shape"))
    old, fingerprints = cached["lengths"], cached.get("episode_stats")
    kept = isinstance(fingerprints, list) and source["episode_stats"][: len(fingerprints)] == fingerprints
    return same and kept and len(old) < len(source["lengths"]) and source["lengths"][: len(old)] == old


def _extend(
    record: dict[str, Any], source: dict[str, Any], frames_path: Path, record_path: Path, shape: tuple[int, ...]
) -> dict[str, Any]:
    """Grow the cache to a data set that gained episodes, keeping the frames already decoded.

    The larger array is written beside the old one and renamed over it before the record changes;
    a process killed in between leaves the larger array under the old record, which the next call
    recognises by its shape and only records."""
    old_shape = (int(sum(record["source"]["lengths"])), *record["source"]["shape"])
    if frames_path.is_file() and all(_frames_file_problem(frames_path, s) for s in (old_shape, shape)):
        frames_path.unlink()  # cut short or overwritten: nothing in it can be trusted; the build starts again
    if frames_path.is_file():
        frames = np.load(frames_path, mmap_mode="r")
        if frames.shape != shape:
            done = int(sum(record["source"]["lengths"][: record["episodes"]]))
            partial = frames_path.with_suffix(".growing.npy")
            grown = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            grown[:done] = frames[:done]
            grown.flush()
            del grown
            os.replace(partial, frames_path)
        del frames
    record = {**record, "source": source}
    _write_json(record_path, record)
    return record


def _frames_file_problem(path: Path, shape: tuple[int, ...]) -> str | None:
    """What is wrong with the cache array ``path`` for frames of ``shape`` (``None``: nothing). Read
    from its header and size, before it is mapped: mapping a short file read-write would extend it
    with zeros (black frames), and read-only would fail with a bare error."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                found, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                found, _, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
        size = path.stat().st_size
    except (OSError, ValueError) as error:
        return f"not a readable array ({error})"
    if tuple(found) != tuple(shape) or dtype != np.uint8:
        return f"holds {dtype} {tuple(found)}, expected uint8 {tuple(shape)}"
    expected = offset + int(np.prod(shape, dtype=np.int64))
    if size != expected:
        return f"is {size} bytes, expected {expected} (truncated or overwritten)"
    return None


class FrameCache:
    """One camera feature's frames, decoded, on disk, memory-mapped (see the module docstring).

    Open a complete cache with ``FrameCache(folder, feature)``; make or finish one with
    :meth:`build`. Instances pickle without their mapping (worker processes map the file again).
    """

    def __init__(self, folder: str | Path, feature: str) -> None:
        self.folder = Path(folder) / feature
        self.feature = feature
        progress = self.folder / "progress.json"
        if not progress.is_file():
            raise DataError(f"{self.folder}: no frame cache here (progress.json is missing); build it first")
        try:
            self.record = json.loads(progress.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{progress}: not a readable frame-cache record ({error})") from error
        if self.record.get("format") != CACHE_FORMAT or self.record.get("version") != CACHE_VERSION:
            raise DataError(f"{progress}: not a {CACHE_FORMAT} version {CACHE_VERSION} record")
        lengths = self.record["source"]["lengths"]
        if self.record["episodes"] != len(lengths):
            raise DataError(
                f"{self.folder}: the cache is incomplete ({self.record['episodes']} of {len(lengths)} episodes); "
                "build it again to finish it"
            )
        self.shape = (int(sum(lengths)), *self.record["source"]["shape"])
        problem = _frames_file_problem(self.folder / "frames.npy", self.shape)
        if problem:
            raise DataError(f"{self.folder / 'frames.npy'} {problem}; build the cache again")
        self._frames: np.ndarray | None = None

    @classmethod
    def build(cls, dataset: EpisodeDataset, feature: str, folder: str | Path, progress: bool = False) -> FrameCache:
        """Decode every frame of ``feature`` into the cache under ``folder`` (resuming an interrupted
        build, doing nothing for a complete one) and open it. A :class:`DataError` names the folder
        when it holds the cache of another data set."""
        source = _source(dataset, feature)
        where = Path(folder) / feature
        where.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(where / ".lock"):
            cls._build(dataset, feature, source, where, progress)
        return cls(folder, feature)

    @staticmethod
    def _build(dataset: EpisodeDataset, feature: str, source: dict[str, Any], where: Path, progress: bool) -> None:
        """:meth:`build`'s work, done while holding the cache's lock."""
        from tqdm.auto import tqdm

        record_path, frames_path = where / "progress.json", where / "frames.npy"
        shape = (int(sum(source["lengths"])), *source["shape"])
        record = None
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(f"{record_path}: not a readable frame-cache record ({error})") from error
            if record.get("source") != source and _extends(record.get("source"), source):
                record = _extend(record, source, frames_path, record_path, shape)
            if record.get("source") != source:
                differs = [k for k in source if record.get("source", {}).get(k) != source[k]]
                raise DataError(
                    f"{where} caches another data set (its {', '.join(differs) or 'record'} differ from "
                    f"{dataset.root}'s); remove it or choose another folder"
                )
            if not frames_path.is_file() or _frames_file_problem(frames_path, shape):
                record = None  # the record outlived its array, or the array was cut short: start again
        if record is None:
            frames = np.lib.format.open_memmap(frames_path, mode="w+", dtype=np.uint8, shape=shape)
            record = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": source, "episodes": 0}
            _write_json(record_path, record)
        else:
            frames = np.load(frames_path, mmap_mode="r+")  # checked above: its full size, shape and dtype
        starts = np.cumsum([0, *source["lengths"]])
        episodes = range(record["episodes"], len(source["lengths"]))
        for episode in tqdm(episodes, desc=f"cache {feature}", disable=not progress, leave=False):
            decoded = dataset.camera_frames(episode, feature).numpy()
            frames[starts[episode] : starts[episode + 1]] = decoded
            frames.flush()
            record["episodes"] = episode + 1
            _write_json(record_path, record)
        del frames

    @property
    def frames(self) -> np.ndarray:
        """The ``(frames, 3, H, W)`` uint8 array, memory-mapped read-only."""
        if self._frames is None:
            self._frames = np.load(self.folder / "frames.npy", mmap_mode="r")
        return self._frames

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index: Sequence[int] | np.ndarray) -> Tensor:
        """Frames ``(len(index), 3, H, W)`` uint8 by global frame index."""
        return torch.from_numpy(np.ascontiguousarray(self.frames[frame_indices(index, len(self))]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frames": None}


def frame_indices(index: Sequence[int] | np.ndarray, frames: int) -> np.ndarray:
    """``index`` as int64 global frame indices, each in ``[0, frames)``: a negative, fractional or
    too large one is an ``IndexError`` (NumPy would read a negative one from the end)."""
    array = np.asarray(index)
    if array.size and (array.dtype.kind not in "iu" or array.min() < 0 or array.max() >= frames):
        wrong = array.ravel()[0] if array.dtype.kind not in "iu" else (array.min() if array.min() < 0 else array.max())
        raise IndexError(f"frame index {wrong!r}: expected integers in [0, {frames - 1}]")
    return array.astype(np.int64, copy=False)


class EncodedFrames:
    """An image feature's PNG files in one byte buffer, decoded by global frame index (see the module docstring)."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shape: Sequence[int], feature: str) -> None:
        self.buffer, self.offsets, self.feature = buffer, offsets, feature
        self.shape = (len(offsets) - 1, *shape)

    @classmethod
    def from_dataset(cls, dataset: EpisodeDataset, feature: str, progress: bool = False) -> EncodedFrames:
        """Read every PNG file of the image feature ``feature`` (video features: use a :class:`FrameCache`)."""
        from tqdm.auto import tqdm

        source = _source(dataset, feature)
        if dataset.features[feature]["dtype"] != "image":
            raise DataError(
                f"{dataset.root}: {feature!r} is a video; decoding per batch reads image features "
                "(use the frame cache for videos)"
            )
        chunks: list[bytes] = []
        for episode in tqdm(range(len(dataset.lengths)), desc=f"read {feature}", disable=not progress, leave=False):
            for value in dataset.episode_columns(episode)[feature]:
                data = value["bytes"] if isinstance(value, dict) else value
                if not isinstance(data, bytes | bytearray):
                    raise DataError(
                        f"{dataset.root}: episode {episode} of {feature!r} holds no image bytes "
                        "(images stored as file paths: use the frame cache)"
                    )
                chunks.append(bytes(data))
        offsets = np.cumsum([0, *map(len, chunks)]).astype(np.int64)
        buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        return cls(buffer, offsets, source["shape"], feature)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index: Sequence[int] | np.ndarray) -> Tensor:
        """Frames ``(len(index), 3, H, W)`` uint8 by global frame index, decoded now."""
        frames = []
        for i in frame_indices(index, len(self)):
            data = self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()
            image = decode_png(data, f"{self.feature}, frame {i}")
            if tuple(image.shape) != self.shape[1:]:
                raise DataError(f"{self.feature}, frame {i}: decoded {tuple(image.shape)}, expected {self.shape[1:]}")
            frames.append(image)
        return torch.stack(frames) if frames else torch.zeros(0, *self.shape[1:], dtype=torch.uint8)


class MemoryFrames:
    """Every frame of a camera feature decoded into memory once: ``(frames, 3, H, W)`` uint8."""

    def __init__(self, frames: Tensor) -> None:
        self.frames = frames
        self.shape = tuple(frames.shape)

    @classmethod
    def from_dataset(cls, dataset: EpisodeDataset, feature: str, progress: bool = False) -> MemoryFrames:
        from tqdm.auto import tqdm

        _source(dataset, feature)
        episodes = range(len(dataset.lengths))
        parts = [
            dataset.camera_frames(e, feature)
            for e in tqdm(episodes, desc=f"decode {feature}", disable=not progress, leave=False)
        ]
        return cls(torch.cat(parts))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index: Sequence[int] | np.ndarray) -> Tensor:
        return self.frames[torch.as_tensor(frame_indices(index, len(self)))]


__all__ = ["CACHE_FORMAT", "EncodedFrames", "FrameCache", "MemoryFrames"]
