"""Pathfinder stimuli: rendering one sample, and writing whole datasets to disk.

A sample is a dark canvas with a *target* contour of ``contour_length`` short paddles
(dashes) that starts at a marker dot, plus *distractor* contours made of the same
paddles. Its segmentation label is the target contour: the marker, the paddles and the
short gaps between consecutive paddles (the contour runs through its gaps), so every
label is one 8-connected component that contains the marker. No distractor pixel
touches (8-neighbour) a label pixel.

Geometry is given in *render* pixels: the canvas is drawn at ``image_size * render_scale``
and reduced by block averaging, so the image is anti-aliased while the label and the
distractor mask are exactly the output pixels that any target / distractor render pixel
falls into (this keeps 8-connectivity and makes "image pixel > 0" agree with the masks).
Every sample is drawn from its own seed derived from ``(seed, split, index)``, so a
dataset is byte-identical for a seed whatever the number of worker processes.

This module needs only NumPy and OpenCV (no Detectron2); ``datasets/prepare_pathfinder.py``
is a thin wrapper around :func:`main`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import multiprocessing as mp
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

__all__ = [
    "PathfinderSettings",
    "PathfinderSample",
    "PAPER_PRESET",
    "CPU_PRESET",
    "PRESETS",
    "PRESET_SPLIT_SIZES",
    "FORMAT_VERSION",
    "SPLITS",
    "default_dataset_name",
    "datasets_root",
    "prepare_command",
    "render_sample",
    "sample_rng",
    "generate_pathfinder",
    "build_argument_parser",
    "main",
]

FORMAT_VERSION = 1
SPLITS = ("train", "test")
_SPLIT_IDS = {"train": 0, "test": 1}
_SHIFT = 4  # OpenCV drawing with sub-pixel coordinates: points are scaled by 2**_SHIFT
_MAX_SAMPLE_ATTEMPTS = 500  # whole-sample restarts before the settings are declared infeasible
_MAX_STEP_TRIES = 20  # re-drawn turns for one paddle before its contour is restarted
_MAX_CONTOUR_TRIES = 50  # attempts to place one contour before the sample restarts


@dataclass(frozen=True)
class PathfinderSettings:
    """Everything a Pathfinder sample depends on (besides its seed).

    Lengths are in render pixels (the canvas is drawn at ``image_size * render_scale`` and
    then reduced to ``image_size``). ``continuity`` is the largest turn, in radians, between
    the directions of two consecutive paddles of a contour.
    """

    contour_length: int = 14  # paddles in the target contour (the "N" of Pathfinder-N)
    image_size: int = 150  # side of the saved (square) image, in pixels
    render_scale: float = 2.0  # the canvas is drawn this many times larger, then reduced
    paddle_length: float = 5.0  # length of one paddle (dash)
    paddle_thickness: int = 2  # line thickness of paddles, gaps (in the label) and the marker outline
    paddle_margin: float = 3.0  # gap between consecutive paddles of a contour
    continuity: float = 0.6  # max turn between consecutive paddles, radians
    marker_radius: float = 5.0  # radius of the marker dot at the start of the target
    distractor_length: int | None = None  # paddles per distractor; None: round(contour_length / 3)
    num_distractors: int | None = None  # distractor contours; None: round(distractor_paddles / distractor_length)
    distractor_paddles: int = 30  # paddle budget that sets num_distractors when it is None

    def resolved(self) -> "PathfinderSettings":
        """Fill the ``None`` fields from their rules and check every value."""
        d_len = self.distractor_length
        if d_len is None:
            d_len = max(1, round(self.contour_length / 3))
        n_d = self.num_distractors
        if n_d is None:
            n_d = max(1, round(self.distractor_paddles / d_len))
        out = dataclasses.replace(self, distractor_length=d_len, num_distractors=n_d)
        out.validate()
        return out

    def validate(self) -> None:
        checks = {
            "contour_length": (self.contour_length >= 1, "an integer >= 1"),
            "image_size": (self.image_size >= 8, "an integer >= 8"),
            "render_scale": (self.render_scale >= 1.0, "a number >= 1"),
            "paddle_length": (self.paddle_length > 0, "a number > 0"),
            "paddle_thickness": (self.paddle_thickness >= 1, "an integer >= 1"),
            "paddle_margin": (self.paddle_margin > 0, "a number > 0"),
            "continuity": (0 <= self.continuity <= math.pi, "radians in [0, pi]"),
            "marker_radius": (self.marker_radius > 0, "a number > 0"),
            "distractor_length": (self.distractor_length is None or self.distractor_length >= 1, "an integer >= 1"),
            "num_distractors": (self.num_distractors is None or self.num_distractors >= 0, "an integer >= 0"),
            "distractor_paddles": (self.distractor_paddles >= 0, "an integer >= 0"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"Pathfinder setting {key}={getattr(self, key)!r} is not valid; allowed: {allowed}.")

    @property
    def render_size(self) -> int:
        return int(round(self.image_size * self.render_scale))


# The paper's stimuli (DESIGN.md): 300x300 canvas reduced to 150x150, 5 px paddles,
# thickness 2, 3 px margin, marker radius 5, distractors of N/3 paddles, about 30/(N/3) of them.
# The reference generator's continuity setting (1.8) is in its own units; here it is a max
# turn in radians.
PAPER_PRESET = PathfinderSettings()

# CPU scale: a 64x64 image (drawn at 128x128) that a 16-channel hGRU with 7x7 kernels learns
# in minutes on 2 cores. In output pixels: paddles of 3 px, 1-2 px thick, 2 px gaps, marker
# radius 2, and 12 distractor paddles in all. Tune the CPU task here.
CPU_PRESET = PathfinderSettings(
    contour_length=9,
    image_size=64,
    render_scale=2.0,
    paddle_length=6.0,
    paddle_thickness=2,
    paddle_margin=4.0,
    continuity=0.6,
    marker_radius=4.0,
    distractor_paddles=12,
)

PRESETS: dict[str, PathfinderSettings] = {"paper": PAPER_PRESET, "cpu": CPU_PRESET}
# Default (train, test) sizes: the paper's 200k/10k, and a CPU set that generates in about a minute.
PRESET_SPLIT_SIZES: dict[str, tuple[int, int]] = {"paper": (200_000, 10_000), "cpu": (20_000, 1_000)}


@dataclass
class PathfinderSample:
    """One rendered stimulus (all arrays are ``image_size x image_size``)."""

    image: np.ndarray  # uint8 grayscale stimulus
    label: np.ndarray  # uint8, 255 on the target contour (marker, paddles, gaps), 0 elsewhere
    distractors: np.ndarray  # bool, pixels drawn by distractor paddles
    marker: tuple[int, int]  # (row, col) of the marker centre
    attempts: int  # whole-sample restarts it took (1 = first try)


def default_dataset_name(preset: str, contour_length: int) -> str:
    """``pathfinder{N}`` for the paper preset, ``pathfinder_cpu{N}`` for the CPU preset."""
    return f"pathfinder{contour_length}" if preset == "paper" else f"pathfinder_{preset}{contour_length}"


def datasets_root(root: str | None = None) -> str:
    """The datasets root as Detectron2 resolves it: ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


_SETTING_FLAGS = {
    "image_size": "--image-size",
    "render_scale": "--render-scale",
    "paddle_length": "--paddle-length",
    "paddle_thickness": "--paddle-thickness",
    "paddle_margin": "--paddle-margin",
    "continuity": "--continuity",
    "marker_radius": "--marker-radius",
    "distractor_length": "--distractor-length",
    "num_distractors": "--num-distractors",
}


def prepare_command(
    name: str,
    preset: str,
    contour_length: int | str,
    settings: PathfinderSettings | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int | None = None,
    root: str | None = None,
) -> str:
    """The ``prepare_pathfinder.py`` command line that makes dataset ``name``.

    Flags are listed only where they differ from the preset (and the default root).
    """
    parts = ["python datasets/prepare_pathfinder.py", f"--preset {preset}", f"--contour-length {contour_length}"]
    parts.append(f"--name {name}")
    if settings is not None:
        base = dataclasses.replace(PRESETS[preset], contour_length=settings.contour_length)
        if settings.distractor_length == base.resolved().distractor_length:
            settings = dataclasses.replace(settings, distractor_length=None)
        if settings.num_distractors == dataclasses.replace(base, distractor_length=settings.distractor_length).resolved().num_distractors:
            settings = dataclasses.replace(settings, num_distractors=None)
        for field, flag in _SETTING_FLAGS.items():
            value = getattr(settings, field)
            if value is not None and value != getattr(base, field):
                parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    sizes = PRESET_SPLIT_SIZES[preset]
    if num_train is not None and num_train != sizes[0]:
        parts.append(f"--num-train {num_train}")
    if num_test is not None and num_test != sizes[1]:
        parts.append(f"--num-test {num_test}")
    if seed is not None and seed != 0:
        parts.append(f"--seed {seed}")
    if root is not None and os.path.abspath(root) != os.path.abspath(datasets_root()):
        parts.append(f"--root {root}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of worker count and order."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split={split!r} is not valid; allowed values: {', '.join(SPLITS)}.")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_IDS[split], index)))


Point = tuple[float, float]  # (x, y) in render pixels


def _pt(x: float, y: float) -> tuple[int, int]:
    """Float point -> OpenCV fixed-point integer point."""
    return int(round(x * (1 << _SHIFT))), int(round(y * (1 << _SHIFT)))


class _Canvas:
    """Render-resolution bookkeeping: occupied zones that new contours must keep clear of."""

    def __init__(self, s: PathfinderSettings):
        self.s = s
        self.size = s.render_size
        scale = self.size / s.image_size
        # Two render pixels at Chebyshev distance >= 2*scale land in output pixels that are
        # not 8-neighbours, so zones dilated by this distance guarantee the no-touch rule.
        self.touch = max(1, math.ceil(2 * scale))
        self.clear = max(self.touch, math.ceil(s.paddle_margin) + 1)
        self.pad = s.paddle_thickness + 1
        self.blocked = np.zeros((self.size, self.size), np.uint8)  # zones no new contour may enter
        self.zone_kernel = np.ones((2 * self.clear - 1, 2 * self.clear - 1), np.uint8)
        self.touch_kernel = np.ones((2 * self.touch - 1, 2 * self.touch - 1), np.uint8)

    def inside(self, p: Point) -> bool:
        lo, hi = self.pad, self.size - 1 - self.pad
        return lo <= p[0] <= hi and lo <= p[1] <= hi

    def segment(self, a: Point, b: Point, grow: int = 0, also: Point | None = None) -> tuple[tuple[slice, slice], np.ndarray]:
        """Draw the segment a-b in a window around it (``grow`` extra pixels on every side).

        With ``also`` (a point on a-b), the segment also-b is drawn too, so the mask holds the
        exact pixels of a paddle drawn alone. Returns the window's slices into the canvas and
        the drawn window; working in small windows keeps generation fast on large canvases.
        """
        reach = self.s.paddle_thickness + grow + 2
        x0 = max(int(min(a[0], b[0])) - reach, 0)
        y0 = max(int(min(a[1], b[1])) - reach, 0)
        x1 = min(int(max(a[0], b[0])) + reach + 2, self.size)
        y1 = min(int(max(a[1], b[1])) + reach + 2, self.size)
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for start in (a,) if also is None else (a, also):
            cv2.line(m, _pt(start[0] - x0, start[1] - y0), _pt(b[0] - x0, b[1] - y0), 1, self.s.paddle_thickness,
                     cv2.LINE_8, _SHIFT)
        return (slice(y0, y1), slice(x0, x1)), m

    def draw(self, out: np.ndarray, a: Point, b: Point) -> None:
        """OR the segment a-b into the full-canvas mask ``out``."""
        win, m = self.segment(a, b)
        out[win] |= m


def _walk(
    canvas: _Canvas,
    rng: np.random.Generator,
    start: Point,
    heading: float,
    n_paddles: int,
    first_gap: float,
    start_zone: tuple[tuple[slice, slice], np.ndarray] | None,
) -> tuple[list[tuple[Point, Point]], np.ndarray] | None:
    """A self-avoiding chain of ``n_paddles`` (gap, paddle) steps, or None if it got stuck.

    Returns the paddles as (start, end) points and the mask of the whole path (gaps
    included). A step may not enter ``canvas.blocked`` nor come within the clearance of
    its own path except the step before it.
    """
    s = canvas.s
    p = start
    own_zone = np.zeros_like(canvas.blocked)  # dilated steps older than the previous one
    prev_zone = start_zone  # dilated previous step (or the marker), not yet in own_zone
    path = np.zeros_like(canvas.blocked)
    paddles = []
    for k in range(n_paddles):
        gap = first_gap if k == 0 else s.paddle_margin
        for _ in range(_MAX_STEP_TRIES):
            theta = heading if k == 0 else heading + rng.uniform(-s.continuity, s.continuity)
            dx, dy = math.cos(theta), math.sin(theta)
            a = (p[0] + gap * dx, p[1] + gap * dy)
            b = (a[0] + s.paddle_length * dx, a[1] + s.paddle_length * dy)
            if not canvas.inside(b):
                continue
            win, step = canvas.segment(p, b, grow=canvas.clear, also=a)
            if (step & (canvas.blocked[win] | own_zone[win])).any():
                continue
            break
        else:
            return None
        heading = theta
        if prev_zone is not None:
            own_zone[prev_zone[0]] |= prev_zone[1]
        prev_zone = (win, cv2.dilate(step, canvas.zone_kernel))
        path[win] |= step
        paddles.append((a, b))
        p = b
    return paddles, path


def _reduce(render: np.ndarray, out_size: int) -> np.ndarray:
    """Block-average a square render to ``out_size``: render pixel y falls in output pixel y*out//in."""
    n = render.shape[0]
    if n == out_size:
        return render.astype(np.float64)
    if n % out_size == 0:
        k = n // out_size
        return render.reshape(out_size, k, out_size, k).mean(axis=(1, 3))
    owner = (np.arange(n) * out_size) // n
    pool = np.zeros((out_size, n))
    pool[owner, np.arange(n)] = 1.0
    counts = pool.sum(1)
    return (pool @ render.astype(np.float64) @ pool.T) / np.outer(counts, counts)


def _try_render(s: PathfinderSettings, rng: np.random.Generator) -> PathfinderSample | None:
    canvas = _Canvas(s)
    n = canvas.size
    # Target: the marker, then contour_length paddles; the first gap starts at the marker's centre.
    marker_c = tuple(rng.uniform(canvas.pad + s.marker_radius, n - 1 - canvas.pad - s.marker_radius, size=2))
    marker = np.zeros((n, n), np.uint8)
    cv2.circle(marker, _pt(*marker_c), int(round(s.marker_radius * (1 << _SHIFT))), 1, -1, cv2.LINE_8, _SHIFT)
    heading = rng.uniform(0, 2 * math.pi)
    full = (slice(0, n), slice(0, n))
    walked = _walk(canvas, rng, marker_c, heading, s.contour_length, s.marker_radius + s.paddle_margin,
                   (full, cv2.dilate(marker, canvas.zone_kernel)))
    if walked is None:
        return None
    target_paddles, target_path = walked
    target_label = target_path | marker
    target_ink = marker.copy()
    for a, b in target_paddles:
        canvas.draw(target_ink, a, b)
    # Distractors keep the clearance from the target and must not touch each other.
    canvas.blocked = cv2.dilate(target_label, canvas.zone_kernel)
    distractor_ink = np.zeros((n, n), np.uint8)
    for _ in range(s.num_distractors):
        for _ in range(_MAX_CONTOUR_TRIES):
            start = tuple(rng.uniform(canvas.pad, n - 1 - canvas.pad, size=2))
            walked = _walk(canvas, rng, start, rng.uniform(0, 2 * math.pi), s.distractor_length, 0.0, None)
            if walked is None:
                continue
            paddles, path = walked
            ink = np.zeros((n, n), np.uint8)
            for a, b in paddles:
                canvas.draw(ink, a, b)
            distractor_ink |= ink
            canvas.blocked |= cv2.dilate(path, canvas.touch_kernel)
            break
        else:
            return None
    # Reduce to the output size; masks are "any render pixel in the block".
    image = np.clip(np.rint(_reduce(np.maximum(target_ink, distractor_ink) * 255.0, s.image_size)), 0, 255)
    label = _reduce(target_label, s.image_size) > 0
    distractors = _reduce(distractor_ink, s.image_size) > 0
    rc = (int(round(marker_c[1])) * s.image_size // n, int(round(marker_c[0])) * s.image_size // n)
    if not _label_is_valid(label, distractors, rc):
        return None
    return PathfinderSample(image.astype(np.uint8), label.astype(np.uint8) * 255, distractors, rc, 0)


def _label_is_valid(label: np.ndarray, distractors: np.ndarray, marker: tuple[int, int]) -> bool:
    """One 8-connected component that holds the marker, and no distractor pixel touching it."""
    count, comp = cv2.connectedComponents(label.astype(np.uint8), connectivity=8)
    if count != 2 or comp[marker] != 1:
        return False
    return not (cv2.dilate(label.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & distractors).any()


def render_sample(settings: PathfinderSettings, rng: np.random.Generator | int) -> PathfinderSample:
    """Render one stimulus with its label and distractor mask (in memory).

    ``rng`` is a NumPy generator or an integer seed. Candidates that break the label rules are
    redrawn; settings that leave no room (e.g. a long contour on a small canvas) raise
    ``ValueError``.
    """
    s = settings.resolved()
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    for attempt in range(1, _MAX_SAMPLE_ATTEMPTS + 1):
        sample = _try_render(s, rng)
        if sample is not None:
            sample.attempts = attempt
            return sample
    raise ValueError(
        f"Could not place a {s.contour_length}-paddle target and {s.num_distractors} distractors of "
        f"{s.distractor_length} paddles on a {s.image_size}x{s.image_size} image in {_MAX_SAMPLE_ATTEMPTS} "
        "attempts. Use a larger --image-size, a shorter --contour-length, or fewer/shorter distractors "
        "(--num-distractors, --distractor-length)."
    )


# --------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(settings: PathfinderSettings, seed: int, split: str, out_dir: str) -> None:
    cv2.setNumThreads(1)
    _worker_state.update(settings=settings, seed=seed, split=split, out_dir=out_dir)


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"Could not write {path} (is the disk full or the directory read-only?).")


def _render_and_write(index: int) -> dict:
    st = _worker_state
    sample = render_sample(st["settings"], sample_rng(st["seed"], st["split"], index))
    file_name = f"images/{index:06d}.png"
    label_name = f"labels/{index:06d}.png"
    _write_png(os.path.join(st["out_dir"], file_name), sample.image)
    _write_png(os.path.join(st["out_dir"], label_name), sample.label)
    height, width = sample.image.shape
    return {
        "file_name": file_name,
        "sem_seg_file_name": label_name,
        "height": height,
        "width": width,
        "image_id": index,
        "marker": list(sample.marker),
    }


def _write_split(settings, seed: int, split: str, count: int, out_dir: str, workers: int, progress: bool, desc: str):
    os.makedirs(os.path.join(out_dir, "images"))
    os.makedirs(os.path.join(out_dir, "labels"))
    init_args = (settings, seed, split, out_dir)
    bar = dict(total=count, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    if workers <= 1 or count < 2 * workers:
        _init_worker(*init_args)
        return [_render_and_write(i) for i in tqdm(range(count), **bar)]
    chunk = max(1, min(64, count // (8 * workers)))
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        return list(tqdm(pool.imap(_render_and_write, range(count), chunksize=chunk), **bar))


def _write_json(path: str, obj: dict, compact: bool = False) -> None:
    with open(path, "w") as f:
        if compact:  # large indexes: one line, no spaces
            json.dump(obj, f, sort_keys=True, separators=(",", ":"))
        else:
            json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def _summary(name: str, preset: str, settings: PathfinderSettings, seed: int, num_train: int, num_test: int) -> dict:
    return {
        "format": "rfpn-pathfinder",
        "version": FORMAT_VERSION,
        "name": name,
        "preset": preset,
        "seed": seed,
        "num_samples": {"train": num_train, "test": num_test},
        "settings": dataclasses.asdict(settings),
    }


def _differences(existing: dict, wanted: dict) -> list[str]:
    """What makes an existing dataset's summary differ from the one requested."""
    out = []
    for key in ("format", "version", "seed", "num_samples", "settings"):
        old, new = existing.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def _remove_stale_temporaries(parent: str, name: str) -> None:
    """Delete the hidden build folders of ``name`` that a killed generation left (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
        pid = os.path.basename(path).split(".tmp-", 1)[1].split("-", 1)[0]
        alive = os.path.isdir("/proc") and pid.isdigit() and os.path.exists(f"/proc/{pid}")
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


def generate_pathfinder(
    name: str,
    settings: PathfinderSettings,
    num_train: int,
    num_test: int,
    seed: int = 0,
    root: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    preset: str = "paper",
    progress: bool = True,
) -> str:
    """Write dataset ``name`` under ``<root>/pathfinder/`` and return its directory.

    The dataset is built in a temporary directory beside the target and renamed into place
    when complete (each split's ``index.json`` and the top-level ``dataset.json`` last), so an
    interrupted run never leaves a directory that loads. An existing identical dataset is kept.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"--num-train={num_train} / --num-test={num_test}: sizes must be >= 0.")
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"--name={name!r} is not valid: use a plain directory name such as 'pathfinder14'.")
    settings = settings.resolved()
    if workers is None or workers <= 0:
        workers = os.cpu_count() or 1
    parent = os.path.join(datasets_root(root), "pathfinder")
    target = os.path.join(parent, name)
    summary = _summary(name, preset, settings, seed, num_train, num_test)
    summary_path = os.path.join(target, "dataset.json")
    if os.path.exists(target) and not overwrite:
        try:
            with open(summary_path) as f:
                existing = json.load(f)
            diff = _differences(existing, summary) if isinstance(existing, dict) else ["unreadable dataset.json"]
        except (OSError, ValueError):
            diff = [f"{summary_path} is missing or unreadable"]
        if not diff:
            print(f"Pathfinder dataset {target} already exists with these settings; nothing to do.")
            return target
        raise FileExistsError(
            f"{target} exists but differs from the request ({'; '.join(diff)}). "
            "Pass --overwrite to regenerate it, or choose another --name."
        )
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, name)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        records = {}
        for split, count in (("train", num_train), ("test", num_test)):
            records[split] = _write_split(
                settings, seed, split, count, os.path.join(tmp, split), workers, progress, f"{name} {split}"
            )
        for split in SPLITS:
            index = dict(summary, split=split, num_samples=len(records[split]), records=records[split])
            _write_json(os.path.join(tmp, split, "index.json"), index, compact=True)
        _write_json(os.path.join(tmp, "dataset.json"), summary)
        if os.path.exists(target):
            old = f"{tmp}.old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Wrote Pathfinder dataset {target} ({num_train} train, {num_test} test images).")
    return target


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate a Pathfinder segmentation dataset under $DETECTRON2_DATASETS/pathfinder/<name>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: 150x150 images drawn at 300x300; cpu: 64x64 images for CPU training")
    p.add_argument("--contour-length", type=int, default=None,
                   help="paddles in the target contour (default: 14 for paper, 9 for cpu)")
    p.add_argument("--name", default=None, help="dataset name (default: pathfinder{N} or pathfinder_cpu{N})")
    p.add_argument("--image-size", type=int, default=None, help="side of the saved images (default: the preset's)")
    p.add_argument("--num-train", type=int, default=None, help="training images (paper: 200000, cpu: 20000)")
    p.add_argument("--num-test", type=int, default=None, help="test images (paper: 10000, cpu: 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; the same seed gives the same files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--root", default=datasets_root(), help="datasets root ($DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--overwrite", action="store_true", help="regenerate the dataset if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("geometry (render pixels; default: the preset's)")
    g.add_argument("--render-scale", type=float, default=None, help="draw at this multiple of --image-size")
    g.add_argument("--paddle-length", type=float, default=None)
    g.add_argument("--paddle-thickness", type=int, default=None)
    g.add_argument("--paddle-margin", type=float, default=None, help="gap between consecutive paddles")
    g.add_argument("--continuity", type=float, default=None, help="max turn between paddles, radians")
    g.add_argument("--marker-radius", type=float, default=None)
    g.add_argument("--distractor-length", type=int, default=None, help="paddles per distractor")
    g.add_argument("--num-distractors", type=int, default=None, help="distractor contours per image")
    return p


def settings_from_args(args: argparse.Namespace) -> PathfinderSettings:
    """The preset's settings with every explicitly given flag applied on top."""
    overrides = {field: getattr(args, field) for field in ("contour_length", *_SETTING_FLAGS)}
    return dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; returns the dataset directory."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    sizes = PRESET_SPLIT_SIZES[args.preset]
    try:
        return generate_pathfinder(
            name=args.name or default_dataset_name(args.preset, settings.contour_length),
            settings=settings,
            num_train=sizes[0] if args.num_train is None else args.num_train,
            num_test=sizes[1] if args.num_test is None else args.num_test,
            seed=args.seed,
            root=args.root,
            workers=args.workers,
            overwrite=args.overwrite,
            preset=args.preset,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
