"""Synthetic parasternal long-axis (PLAX) echo videos with a severe aortic stenosis label.

The embedded default data set: no labelled echo data can be downloaded here, so the project
draws its own. Each patient has one study of 1 to 4 videos that share the patient's anatomy
and label. The acquisition settings (depth, probe angle and position, gain, dynamic range,
sector, point-spread function, valve visibility) are drawn once per study and jittered per
video by ``view_jitter`` (``VIEW_JITTER``: ``independent`` draws them afresh for every
video); heart rate, cardiac phase, respiration and noise are per video at every level.

Image model, per frame (all vectorised over ``(T, H, W)``):

- anatomy in heart coordinates (cm, origin at the aortic valve, ``u`` towards the aorta,
  ``v`` away from the probe): left-ventricular cavity (contracts in systole), LV outflow
  tract and aortic root with sinus bulge, left atrium, right ventricle, descending aorta,
  bright aortic walls and pericardium, mitral leaflets (open in diastole) and two aortic
  valve leaflets (open in systole);
- a per-video similarity transform (probe angle, depth, position) plus cardiac and
  respiratory motion maps pixels to heart coordinates;
- reflectivity times complex speckle that moves with the tissue (it is fixed to the heart and
  follows its motion) and decorrelates gradually: an AR(1) process in time, correlation
  ``rho ** lag`` between frames, so frame order shows in the texture as well as in the
  motion; blurred by an anisotropic point-spread function; envelope, depth attenuation,
  log compression with per-study gain and dynamic range; black outside the sector.

The label lives only in the aortic valve: a per-patient severity, drawn from overlapping
distributions for severe and not severe (separation scaled by ``difficulty``), sets leaflet
thickness, brightness and systolic opening. Every other parameter is drawn from random
streams that never see the label, so rendering a video twice with only the label flipped
changes no pixel outside the valve's box (``valve_box``).

Randomness: patient ``p``'s anatomy comes from ``default_rng([seed, p, ANATOMY])``, its
valve from ``default_rng([seed, p, VALVE])``, its study's acquisition settings from
``default_rng([seed, p, STUDY])``, video ``v``'s jitter, timing and noise from
``default_rng([seed, p, v])``; labels and splits from dataset-level streams. Same seed,
same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from echo.data import storage
from echo.data.video import encode_mp4

__all__ = [
    "SynthConfig",
    "VIEW_JITTER",
    "ACQUISITION",
    "PatientParams",
    "StudyView",
    "VideoParams",
    "MANIFEST_COLUMNS",
    "sample_patient",
    "sample_study",
    "sample_video",
    "leaflet_px_by_label",
    "assign_labels_and_splits",
    "cardiac_timeline",
    "sector_mask",
    "valve_box",
    "render_video",
    "synthesize",
    "save_example_frames",
]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "video_uri", "patient_id", "study_id", "split", "label", "n_frames", "fps",
    "valve_x0", "valve_y0", "valve_x1", "valve_y1",
    "view_angle_deg", "depth_cm", "gain_db", "heart_rate_bpm",
    "sector_apex_x", "sector_apex_y", "sector_radius", "sector_half_angle_deg", "valve_severity",
)

# Stream tags for SeedSequence keys [seed, patient, tag]; far above any video index, because
# SeedSequence treats a key with a trailing 0 like the shorter key ([s, p] == [s, p, 0]).
_ANATOMY = 2**40 + 1
_VALVE = 2**40 + 2
_LABELS = 2**40 + 3
_SPLITS = 2**40 + 4
_STUDY = 2**40 + 5

VIEW_JITTER = ("independent", "moderate", "small")


@dataclass(frozen=True)
class _Setting:
    """One acquisition setting: its population range (uniform, drawn per study) and the
    standard deviation of the per-video jitter around the study's value at ``moderate`` and
    ``small`` (clipped to the population range). Units as in ``VideoParams``."""

    low: float
    high: float
    moderate: float
    small: float


# The levels' magnitudes are fixed here and justified in docs/synth-frames.md. Widths of the
# point-spread function are in pixels at 112 px (scaled with the frame size); ``apex_frac``
# is the apex's offset as a fraction of the frame size.
ACQUISITION: dict[str, _Setting] = {
    "depth_cm": _Setting(13.0, 18.0, 0.5, 0.2),
    "angle_offset_deg": _Setting(-10.0, 10.0, 3.0, 1.0),
    "shift_u_cm": _Setting(-0.5, 0.5, 0.15, 0.05),
    "shift_depth_cm": _Setting(-0.6, 0.6, 0.15, 0.05),
    "gain_db": _Setting(-4.0, 4.0, 1.0, 0.3),
    "dynamic_range_db": _Setting(30.0, 38.0, 1.0, 0.3),
    "half_angle_deg": _Setting(36.0, 44.0, 1.5, 0.5),
    "apex_frac": _Setting(-0.03, 0.03, 0.005, 0.002),
    "valve_visibility": _Setting(0.65, 1.0, 0.07, 0.02),
    "attenuation_per_cm": _Setting(-0.05, 0.03, 0.01, 0.003),
    "psf_lateral_px": _Setting(0.9, 1.4, 0.05, 0.02),
    "psf_axial_px": _Setting(0.5, 0.8, 0.03, 0.01),
    "noise_floor": _Setting(0.001, 0.005, 0.0005, 0.0002),
}

# Mean gap, in standard deviations, between the latent severity of severe and not-severe
# patients at difficulty 1 (an ideal observer of the latent alone reaches AUROC ~0.96).
_SEPARATION = 2.5
_VIDEOS_PER_STUDY_P = (0.1, 0.35, 0.35, 0.2)  # P(1), P(2), P(3), P(4) videos
_BLOOD = 0.004
_SPLIT_NAMES = ("train", "val", "test")
# Independent complex speckle fields summed in power (compounding): 1 gives a Rayleigh
# amplitude with deep nulls, 2 a gamma-distributed intensity of shape 2.
_LOOKS = 2
# Support of a line's profile in units of its Gaussian-equivalent sigma (same integral).
_LINE_SUPPORT = 2.35


@dataclass(frozen=True)
class SynthConfig:
    """What ``synthesize`` writes. ``splits`` are the train/val/test fractions of labelled patients."""

    out: str
    patients: int
    seed: int
    prevalence: float = 0.15
    splits: tuple[float, float, float] = (0.7, 0.1, 0.2)
    unlabeled_patients: int = 0
    size: int = 112
    fps: float = 30.0
    min_frames: int = 48
    max_frames: int = 96
    difficulty: float = 1.0
    view_jitter: str = "moderate"
    workers: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.patients < 0 or self.unlabeled_patients < 0 or self.patients + self.unlabeled_patients < 1:
            problems.append(f"patients ({self.patients}) and unlabeled_patients ({self.unlabeled_patients}) "
                            "must be >= 0 with at least one patient in all")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.prevalence <= 1:
            problems.append(f"prevalence must be in [0, 1], got {self.prevalence}")
        splits = tuple(self.splits)
        if len(splits) != 3 or min(splits) < 0 or not math.isclose(sum(splits), 1, abs_tol=1e-6):
            problems.append(f"splits must be three fractions (train, val, test) >= 0 summing to 1, got {splits}")
        if self.size < 32 or self.size % 2:
            problems.append(f"size must be an even number of pixels >= 32, got {self.size}")
        if self.fps <= 0:
            problems.append(f"fps must be > 0, got {self.fps}")
        if not 2 <= self.min_frames <= self.max_frames:
            problems.append(f"need 2 <= min_frames <= max_frames, got {self.min_frames} and {self.max_frames}")
        if self.difficulty <= 0:
            problems.append(f"difficulty must be > 0, got {self.difficulty}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.view_jitter not in VIEW_JITTER:
            problems.append(f"view_jitter must be one of {', '.join(VIEW_JITTER)}, got {self.view_jitter!r}")
        if problems:
            raise ValueError("invalid synth settings: " + "; ".join(problems))


@dataclass(frozen=True)
class PatientParams:
    """One patient's anatomy (cm), heart rate and aortic valve; shared by all their videos.

    ``severity`` in (0, 1) drives the valve: ``leaflet_cm`` (full thickness),
    ``leaflet_reflectivity`` (relative to myocardium ~0.35) and ``max_opening`` (systolic
    gap between leaflet tips as a fraction of the aortic diameter). Leaflets are 0.1 cm thick
    at severity 0 and 0.75 cm at 1 (thin normal cusps; thick, calcified severe ones), so the
    class means differ by at least 2 px from 96 px frames up (``leaflet_px_by_label``).
    """

    index: int
    label: int
    severity: float
    leaflet_cm: float
    leaflet_reflectivity: float
    max_opening: float
    aortic_radius_cm: float
    lv_half_length_cm: float
    lv_half_width_cm: float
    lv_shortening: float
    wall_cm: float
    rv_half_width_cm: float
    la_radius_cm: float
    heart_rate_bpm: float
    tilt_deg: float
    valve_depth_cm: float
    tissue: float
    texture: tuple[float, ...]  # two plane waves: (ku, kv, phase) * 2, in rad/cm and rad


@dataclass(frozen=True)
class StudyView:
    """The acquisition settings of one study (``ACQUISITION``'s keys -> values), drawn once per
    patient from the population ranges; each video jitters around them."""

    values: tuple[tuple[str, float], ...]

    def get(self, name: str) -> float:
        return dict(self.values)[name]


@dataclass(frozen=True)
class VideoParams:
    """One video's view of a patient. Lengths in cm, angles in degrees, time in frames and bpm."""

    patient: PatientParams
    size: int
    n_frames: int
    fps: float
    depth_cm: float
    angle_deg: float
    shift_u_cm: float
    shift_depth_cm: float
    heart_rate_bpm: float
    phase0: float
    resp_period_s: float
    resp_amp_cm: float
    resp_phase: float
    gain_db: float
    dynamic_range_db: float
    attenuation_per_cm: float
    psf_lateral_px: float
    psf_axial_px: float
    speckle_memory: float  # AR(1) coefficient of the speckle from one frame to the next
    noise_floor: float
    valve_visibility: float
    half_angle_deg: float
    apex_y: float

    @property
    def radius(self) -> float:
        """Sector radius in pixels."""
        return 0.985 * (self.size - 1) - self.apex_y

    @property
    def px_per_cm(self) -> float:
        return self.radius / self.depth_cm


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` (earlier entries win ties)."""
    raw = [n * f for f in fractions]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _stratum_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """``_split_counts``, then every split of non-zero fraction gets at least one member when
    the stratum has enough (taken from the largest split), so that small data sets still have
    both classes in train, val and test."""
    counts = _split_counts(n, fractions)
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts


def assign_labels_and_splits(cfg: SynthConfig) -> tuple[list[int], list[str]]:
    """Label (0/1) and split of every patient, labelled ones first then ``unlabeled``.

    A ``round(prevalence * n)`` share is severe (at least one, and at least one not severe,
    when prevalence allows and there are two patients or more). Labelled patients are split
    by patient, stratified by label, with largest-remainder rounding and at least one patient
    of each class in every split when the class has enough patients. Unlabeled patients get
    a hidden label at the same prevalence (their videos are drawn with it; the manifest
    leaves it empty).
    """
    labels: list[int] = []
    for n, tag in ((cfg.patients, 0), (cfg.unlabeled_patients, 1)):
        n_pos = round(cfg.prevalence * n)
        if n >= 2 and 0 < cfg.prevalence < 1:
            n_pos = min(max(n_pos, 1), n - 1)
        group_labels = np.zeros(n, dtype=int)
        group_labels[np.random.default_rng([cfg.seed, _LABELS, tag]).permutation(n)[:n_pos]] = 1
        labels.extend(int(x) for x in group_labels)
    splits = ["unlabeled"] * (cfg.patients + cfg.unlabeled_patients)
    for lab in (0, 1):
        members = np.array([i for i in range(cfg.patients) if labels[i] == lab], dtype=int)
        members = members[np.random.default_rng([cfg.seed, _SPLITS, lab]).permutation(len(members))]
        start = 0
        for name, count in zip(_SPLIT_NAMES, _stratum_counts(len(members), cfg.splits)):
            for i in members[start : start + count]:
                splits[int(i)] = name
            start += count
    return labels, splits


def sample_patient(seed: int, index: int, label: int, difficulty: float = 1.0) -> PatientParams:
    """Patient ``index``'s anatomy and valve; only the valve depends on ``label``.

    Latent severity ``s ~ N(label * d, 1)`` with ``d = 2.5 / difficulty``;
    ``severity = sigmoid(1.6 (s - d / 2))``. Leaflet features follow it with independent jitter.
    """
    rng = np.random.default_rng([seed, index, _ANATOMY])
    k = rng.uniform(0.85, 1.15)  # heart size
    anatomy = dict(
        aortic_radius_cm=k * rng.uniform(1.0, 1.35),
        lv_half_length_cm=k * rng.uniform(3.8, 4.8),
        lv_half_width_cm=k * rng.uniform(2.0, 2.7),
        lv_shortening=rng.uniform(0.2, 0.38),
        wall_cm=k * rng.uniform(0.8, 1.2),
        rv_half_width_cm=k * rng.uniform(0.8, 1.3),
        la_radius_cm=k * rng.uniform(1.5, 2.0),
        heart_rate_bpm=rng.uniform(55, 100),
        tilt_deg=rng.uniform(-4, 14),
        valve_depth_cm=rng.uniform(6.2, 7.6),
        tissue=rng.uniform(0.28, 0.42),
    )
    wave_len = rng.uniform(1.5, 4.0, size=2)
    wave_dir = rng.uniform(0, 2 * np.pi, size=2)
    wave_phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = []
    for lam, ang, ph in zip(wave_len, wave_dir, wave_phase):
        texture += [2 * np.pi / lam * np.cos(ang), 2 * np.pi / lam * np.sin(ang), ph]

    vrng = np.random.default_rng([seed, index, _VALVE])
    d = _SEPARATION / difficulty
    s = vrng.normal(label * d, 1.0)
    severity = 1.0 / (1.0 + math.exp(-1.6 * (s - d / 2)))
    jitter = vrng.normal(0.0, 1.0, size=3)
    return PatientParams(
        index=index,
        label=int(label),
        severity=float(severity),
        leaflet_cm=float(max(0.06, 0.1 + 0.65 * severity + 0.03 * jitter[0])),
        leaflet_reflectivity=float(max(0.4, 0.9 + 2.2 * severity + 0.2 * jitter[1])),
        max_opening=float(np.clip(0.88 - 0.58 * severity + 0.05 * jitter[2], 0.15, 0.95)),
        texture=tuple(float(x) for x in texture),
        **{key: float(value) for key, value in anatomy.items()},
    )


def sample_study(seed: int, index: int) -> StudyView:
    """Patient ``index``'s study: every ``ACQUISITION`` setting drawn from its population range."""
    rng = np.random.default_rng([seed, index, _STUDY])
    return StudyView(tuple((name, float(rng.uniform(s.low, s.high))) for name, s in ACQUISITION.items()))


def sample_video(patient: PatientParams, rng: np.random.Generator, size: int = 112, fps: float = 30.0,
                 min_frames: int = 48, max_frames: int = 96, study: StudyView | None = None,
                 view_jitter: str = "independent") -> VideoParams:
    """One view of ``patient``: acquisition settings, timing and noise.

    With ``view_jitter="independent"`` (or no ``study``) every acquisition setting is drawn
    afresh from its population range; otherwise it is ``study``'s value plus Gaussian jitter
    of the level's standard deviation, clipped to the range. ``rng`` is drawn in a fixed
    order that depends on neither the label nor the level.
    """
    if view_jitter not in VIEW_JITTER:
        raise ValueError(f"view_jitter must be one of {', '.join(VIEW_JITTER)}, got {view_jitter!r}")
    scale = size / 112
    fresh = {name: float(rng.uniform(s.low, s.high)) for name, s in ACQUISITION.items()}
    noise = {name: float(rng.standard_normal()) for name in ACQUISITION}
    if study is None or view_jitter == "independent":
        acq = fresh
    else:
        acq = {name: float(np.clip(study.get(name) + getattr(s, view_jitter) * noise[name], s.low, s.high))
               for name, s in ACQUISITION.items()}
    return VideoParams(
        patient=patient,
        size=size,
        n_frames=int(rng.integers(min_frames, max_frames + 1)),
        fps=float(fps),
        depth_cm=acq["depth_cm"],
        angle_deg=patient.tilt_deg + acq["angle_offset_deg"],
        shift_u_cm=acq["shift_u_cm"],
        shift_depth_cm=acq["shift_depth_cm"],
        heart_rate_bpm=patient.heart_rate_bpm * rng.uniform(0.93, 1.07),
        phase0=rng.uniform(0, 1),
        resp_period_s=rng.uniform(3.0, 5.0),
        resp_amp_cm=rng.uniform(0.0, 0.25),
        resp_phase=rng.uniform(0, 2 * np.pi),
        gain_db=acq["gain_db"],
        dynamic_range_db=acq["dynamic_range_db"],
        attenuation_per_cm=acq["attenuation_per_cm"],
        psf_lateral_px=scale * acq["psf_lateral_px"],
        psf_axial_px=scale * acq["psf_axial_px"],
        speckle_memory=rng.uniform(0.75, 0.92),
        noise_floor=acq["noise_floor"],
        valve_visibility=acq["valve_visibility"],
        half_angle_deg=acq["half_angle_deg"],
        apex_y=size * acq["apex_frac"],
    )


def leaflet_px_by_label(size: int, difficulty: float = 1.0, patients: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean aortic leaflet thickness in pixels of not-severe and severe patients at ``size``:
    ``leaflet_cm`` times the mean pixels per cm over the depth range (``patients`` draws)."""
    depth = ACQUISITION["depth_cm"]
    radius = 0.985 * (size - 1)  # the sector radius at apex offset 0 (VideoParams.radius)
    px_per_cm = float(np.mean(radius / np.linspace(depth.low, depth.high, 101)))
    means = [float(np.mean([sample_patient(seed, i, label, difficulty).leaflet_cm for i in range(patients)]))
             for label in (0, 1)]
    return means[0] * px_per_cm, means[1] * px_per_cm


def cardiac_timeline(vp: VideoParams) -> dict[str, np.ndarray]:
    """Per-frame curves, each ``(T,)`` float32: ``phase`` in [0, 1) (0 = end-diastole),
    ``contraction`` (0 relaxed, 1 end-systole), ``av_open`` and ``mv_open`` (0 closed, 1 fully
    open), and the whole-heart displacement ``shift_u``, ``shift_v`` in cm."""
    t = np.arange(vp.n_frames, dtype=np.float64) / vp.fps
    phase = (vp.phase0 + t * vp.heart_rate_bpm / 60.0) % 1.0
    systole = float(np.clip(0.33 + (vp.heart_rate_bpm - 60) * 0.002, 0.3, 0.42))  # fraction of the beat
    contraction = np.where(
        phase < systole,
        np.sin(0.5 * np.pi * phase / systole) ** 2,
        np.where(phase < systole + 0.2, np.cos(0.5 * np.pi * (phase - systole) / 0.2) ** 2, 0.0),
    )
    ejection = np.clip((phase - 0.04) / (systole - 0.04), 0.0, 1.0)
    av_open = np.sqrt(np.maximum(np.sin(np.pi * ejection), 0.0))

    def bump(start: float, width: float) -> np.ndarray:
        x = np.clip((phase - start) / width, 0.0, 1.0)
        return np.sin(np.pi * x)

    mv_open = np.maximum(bump(systole + 0.06, 0.3), 0.7 * bump(0.8, 0.18))  # E and A waves
    shift_u = 0.35 * contraction
    shift_v = vp.resp_amp_cm * np.sin(2 * np.pi * t / vp.resp_period_s + vp.resp_phase)
    return {k: np.asarray(v, dtype=np.float32) for k, v in dict(
        phase=phase, contraction=contraction, av_open=av_open, mv_open=mv_open, shift_u=shift_u, shift_v=shift_v
    ).items()}


def _apex(vp: VideoParams) -> tuple[float, float]:
    return (vp.size - 1) / 2.0, vp.apex_y


def sector_mask(size: int, apex_x: float, apex_y: float, radius: float, half_angle_deg: float) -> np.ndarray:
    """``(size, size)`` bool: pixel centres (x = column, y = row) inside the imaging sector."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - apex_x, y - apex_y
    r = np.hypot(dx, dy)
    return (r <= radius) & (dy > 0) & (np.abs(np.arctan2(dx, dy)) <= np.deg2rad(half_angle_deg))


def _valve_center_px(vp: VideoParams) -> tuple[float, float]:
    ax, ay = _apex(vp)
    ppc = vp.px_per_cm
    depth = vp.patient.valve_depth_cm + vp.shift_depth_cm
    return ax + ppc * (0.6 + vp.shift_u_cm), ay + ppc * depth


def _leaflets(vp: VideoParams, tl: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aortic valve leaflets as segments (hinge, tip), each ``(T, 2)`` in heart coordinates (cm).

    Closed, the tips meet near the root's axis, bowed towards the ventricle; open, each
    leaflet swings downstream by ``phi`` where ``1 - cos(phi)`` is the opening fraction.
    """
    p = vp.patient
    r = p.aortic_radius_cm
    closed = -0.25
    phi_max = math.acos(1.0 - p.max_opening)
    phi = closed + (phi_max - closed) * tl["av_open"].astype(np.float64)
    out = []
    for sign, skew in ((-1.0, 1.0), (1.0, 0.93)):  # anterior (-v) and posterior (+v) cusp
        ph = closed + (phi - closed) * skew
        hinge = np.stack([np.zeros_like(ph), np.full_like(ph, sign * r)], axis=1)
        tip = hinge + r * np.stack([np.sin(ph), -sign * np.cos(ph)], axis=1)
        out.append((hinge, tip))
    return out


def _heart_to_px(vp: VideoParams, tl: dict[str, np.ndarray], pts: np.ndarray) -> np.ndarray:
    """Heart coordinates ``(T, ..., 2)`` (cm, anatomy frame) -> pixels ``(T, ..., 2)`` (x, y)."""
    cx, cy = _valve_center_px(vp)
    th = np.deg2rad(vp.angle_deg)
    expand = (slice(None),) + (None,) * (pts.ndim - 2)
    u = pts[..., 0] - tl["shift_u"][expand]
    v = pts[..., 1] - tl["shift_v"][expand]
    ppc = vp.px_per_cm
    return np.stack([cx + ppc * (np.cos(th) * u - np.sin(th) * v), cy + ppc * (np.sin(th) * u + np.cos(th) * v)], axis=-1)


def valve_box(vp: VideoParams) -> tuple[int, int, int, int]:
    """The aortic valve's bounding box over all frames, pixels, half-open: ``x0 <= x < x1``.

    Covers both leaflets from hinge to tip with their thickness and the point-spread
    function's reach, clipped to the frame: no pixel outside it depends on the valve (so
    none depends on the label).
    """
    tl = cardiac_timeline(vp)
    pts = np.concatenate([np.stack(seg, axis=1) for seg in _leaflets(vp, tl)], axis=1)  # (T, 4, 2)
    px = _heart_to_px(vp, tl, pts)
    line = _line_radius_px(vp.patient.leaflet_cm, 1.0 / vp.px_per_cm) + 1.0
    pad_x = line + _psf_half(vp.psf_lateral_px)
    pad_y = line + _psf_half(vp.psf_axial_px)
    x0 = int(np.floor(px[..., 0].min() - pad_x))
    y0 = int(np.floor(px[..., 1].min() - pad_y))
    x1 = int(np.ceil(px[..., 0].max() + pad_x)) + 1
    y1 = int(np.ceil(px[..., 1].max() + pad_y)) + 1
    n = vp.size
    return max(0, x0), max(0, y0), min(n, x1), min(n, y1)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: ArrayLike, cv: ArrayLike, a: ArrayLike, b: ArrayLike,
             edge: float) -> np.ndarray:
    """Soft inside-mask of an ellipse (centre ``cu, cv``, half-axes ``a, b``; edge width in cm)."""
    q = np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
    return np.clip(0.5 + (1.0 - q) * np.minimum(a, b) / edge, 0.0, 1.0)


def _line_radius_px(width_cm: float, px_cm: float) -> float:
    """Half-width in pixels beyond which ``_line`` is exactly zero."""
    return _LINE_SUPPORT * math.sqrt((width_cm / 2.5 / px_cm) ** 2 + 0.35**2)


def _line(d: np.ndarray, width_cm: float, px_cm: float) -> np.ndarray:
    """Profile of a bright line at distance ``d`` (cm): a compact bump ``(1 - (d/r)^2)^2``
    shaped like a Gaussian of sigma ``width / 2.5`` and exactly 0 beyond ``r``. A line thinner
    than a pixel is widened to ~0.35 px and its peak lowered, keeping its integral."""
    sigma = width_cm / 2.5
    sigma_eff = math.sqrt(sigma**2 + (0.35 * px_cm) ** 2)
    r = _LINE_SUPPORT * sigma_eff
    x = np.clip(1.0 - d * d * _f32(1.0 / r**2), 0.0, 1.0)
    return _f32(sigma / sigma_eff) * x * x


def _f32(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


@dataclass(frozen=True)
class _Grid:
    """Heart coordinates (cm) at rest of pixel centres, over the frame plus ``pad`` pixels each side."""

    u: np.ndarray  # (H + 2 pad, W + 2 pad) float32
    v: np.ndarray
    pad: int

    def frame(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(H, W)`` part that is the frame itself."""
        p = self.pad
        return self.u[p:-p, p:-p], self.v[p:-p, p:-p]


def _grid(vp: VideoParams, pad: int) -> _Grid:
    cx, cy = _valve_center_px(vp)
    ppc = _f32(vp.px_per_cm)
    yy, xx = np.mgrid[-pad : vp.size + pad, -pad : vp.size + pad].astype(np.float32)
    dx, dy = (xx - _f32(cx)) / ppc, (yy - _f32(cy)) / ppc
    th = np.deg2rad(vp.angle_deg)
    return _Grid(_f32(np.cos(th)) * dx + _f32(np.sin(th)) * dy, _f32(-np.sin(th)) * dx + _f32(np.cos(th)) * dy, pad)


def _lv(p: PatientParams) -> tuple[float, float, float]:
    """Left-ventricular cavity centre ``(u, v)`` at rest and its posterior edge ``v``, cm. The
    cavity's top is level with the aortic root's anterior wall, its long axis along ``u``."""
    cv = -p.aortic_radius_cm + 0.15 + p.lv_half_width_cm
    return 0.3 - p.lv_half_length_cm, cv, cv + p.lv_half_width_cm


def _static_maps(vp: VideoParams, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Anatomy that only moves with the whole heart, ``(3, h, w)`` float32 at heart
    coordinates ``u, v`` (cm): tissue reflectivity, blood mask (0..1) and bright boundaries."""
    p = vp.patient
    px_cm = 1.0 / vp.px_per_cm
    edge = max(0.15, 0.7 * px_cm)
    k = p.texture
    tissue = _f32(p.tissue) * (1.0 + 0.22 * np.cos(_f32(k[0]) * u + _f32(k[1]) * v + _f32(k[2]))
                               + 0.15 * np.cos(_f32(k[3]) * u + _f32(k[4]) * v + _f32(k[5])))
    r_ao = p.aortic_radius_cm
    lv_cu, lv_cv, _ = _lv(p)
    rv_b = p.rv_half_width_cm
    blood = _ellipse(u, v, lv_cu + 0.6, -r_ao - p.wall_cm - rv_b, p.lv_half_length_cm * 0.9, rv_b, edge)
    la_cv = r_ao + 0.35 + p.la_radius_cm
    np.maximum(blood, _ellipse(u, v, 1.3, la_cv, p.la_radius_cm * 1.15, p.la_radius_cm, edge), out=blood)
    np.maximum(blood, _ellipse(u, v, 0.8, la_cv + p.la_radius_cm + 1.0, 0.6, 0.6, edge), out=blood)  # descending aorta
    # LV outflow tract and aortic root, with the sinus of Valsalva bulge just past the valve.
    r_u = _f32(r_ao) * (1.0 + 0.18 * np.exp(-(((u - _f32(0.9)) / _f32(0.8)) ** 2)))
    tube = np.clip(0.5 + (r_u - np.abs(v)) / edge, 0.0, 1.0) * np.clip(0.5 + (u + 2.8) / edge, 0.0, 1.0)
    np.maximum(blood, tube, out=blood)
    # Bright boundaries: aortic walls (the anterior one runs into the septum), pericardium.
    downstream = np.clip(0.5 + (u + np.where(v < 0, _f32(0.3), _f32(-0.2))) / edge, 0.0, 1.0)
    bright = _f32(0.9) * _line(np.abs(np.abs(v) - r_u - 0.1), 0.2, px_cm) * downstream
    peri_q = np.sqrt(((u - lv_cu) / (p.lv_half_length_cm + p.wall_cm + 0.3)) ** 2
                     + ((v - lv_cv) / (p.lv_half_width_cm + p.wall_cm + 0.2)) ** 2)
    bright += _f32(4.0) * _line(np.abs(peri_q - 1.0) * _f32(p.lv_half_width_cm + p.wall_cm), 0.35, px_cm) * np.clip(
        v - _f32(lv_cv), 0.0, 1.0)
    return np.stack([tissue, blood, bright]).astype(np.float32, copy=False)


def _motion_px(vp: VideoParams, tl: dict[str, np.ndarray]) -> np.ndarray:
    """Image displacement of the whole heart in each frame, ``(T, 2)`` pixels (x, y)."""
    origin = _heart_to_px(vp, tl, np.zeros((vp.n_frames, 1, 2)))[:, 0]
    return origin - np.array(_valve_center_px(vp))


def _shifted(maps: np.ndarray, pad: int, shift: np.ndarray, n: int, linear: bool) -> np.ndarray:
    """Per-frame windows of padded ``maps`` ``(C, n + 2 pad, n + 2 pad)`` moved by ``shift``
    ``(T, 2)`` pixels (x, y): ``(T, C, n, n)``, bilinear or nearest-pixel."""
    out = np.empty((len(shift), maps.shape[0], n, n), dtype=maps.dtype)
    for t, (sx, sy) in enumerate(shift):
        if not linear:
            x, y = pad - int(round(sx)), pad - int(round(sy))
            out[t] = maps[:, y : y + n, x : x + n]
            continue
        fx, fy = pad - sx, pad - sy
        x, y = int(math.floor(fx)), int(math.floor(fy))
        ax, ay = _f32(fx - x), _f32(fy - y)
        top = maps[:, y : y + n, x : x + n] * (1 - ax) + maps[:, y : y + n, x + 1 : x + n + 1] * ax
        bottom = maps[:, y + 1 : y + n + 1, x : x + n] * (1 - ax) + maps[:, y + 1 : y + n + 1, x + 1 : x + n + 1] * ax
        out[t] = top * (1 - ay) + bottom * ay
    return out


def _add_segment(refl: np.ndarray, vp: VideoParams, tl: dict[str, np.ndarray], grid: _Grid,
                 a: np.ndarray, b: np.ndarray, width_cm: float, brightness: float) -> None:
    """Add, in place, a bright line of ``width_cm`` from ``a`` to ``b`` (each ``(T, 2)``, heart
    coordinates in cm) to ``refl`` ``(T, H, W)``; only pixels near the segment are computed."""
    px_cm = 1.0 / vp.px_per_cm
    ends = _heart_to_px(vp, tl, np.stack([a, b], axis=1))  # (T, 2, 2)
    margin = _line_radius_px(width_cm, px_cm) + 1.0
    n = vp.size
    x0, y0 = (max(0, int(np.floor(ends[..., i].min() - margin))) for i in (0, 1))
    x1, y1 = (min(n, int(np.ceil(ends[..., i].max() + margin)) + 1) for i in (0, 1))
    if x0 >= x1 or y0 >= y1:
        return
    u0, v0 = grid.frame()
    a32, b32 = _f32(a), _f32(b)
    au = a32[:, 0, None, None] - tl["shift_u"][:, None, None]
    av = a32[:, 1, None, None] - tl["shift_v"][:, None, None]
    du, dv = b32[:, 0, None, None] - a32[:, 0, None, None], b32[:, 1, None, None] - a32[:, 1, None, None]
    pu, pv = u0[None, y0:y1, x0:x1] - au, v0[None, y0:y1, x0:x1] - av
    h = np.clip((pu * du + pv * dv) / np.maximum(du * du + dv * dv, _f32(1e-6)), 0.0, 1.0)
    eu, ev = pu - h * du, pv - h * dv
    refl[:, y0:y1, x0:x1] += _f32(brightness) * _line(np.sqrt(eu * eu + ev * ev), width_cm, px_cm)


def _reflectivity(vp: VideoParams, tl: dict[str, np.ndarray], grid: _Grid, shift: np.ndarray) -> np.ndarray:
    """Echo reflectivity ``(T, H, W)`` float32: the moving static anatomy, the contracting left
    ventricle, and the mitral and aortic leaflets."""
    p = vp.patient
    n = vp.size
    maps = _shifted(_static_maps(vp, grid.u, grid.v), grid.pad, shift, n, linear=True)
    tissue, blood, bright = maps[:, 0], maps[:, 1], maps[:, 2]

    t3 = (slice(None), None, None)
    c = tl["contraction"][t3]
    lv_cu, _, lv_bottom = _lv(p)
    lv_b = _f32(p.lv_half_width_cm) * (1.0 - _f32(p.lv_shortening) * c)
    u0, v0 = grid.frame()
    # The posterior wall stays put; the cavity shrinks towards it.
    lv = _ellipse(u0[None] + tl["shift_u"][t3], v0[None] + tl["shift_v"][t3], _f32(lv_cu), _f32(lv_bottom) - lv_b,
                  _f32(p.lv_half_length_cm) * (1.0 - _f32(0.08) * c), lv_b, max(0.15, 0.7 / vp.px_per_cm))
    np.maximum(blood, lv, out=blood)
    refl = tissue + (_f32(_BLOOD) - tissue) * blood + bright

    # Mitral leaflets: closed in systole (across the inflow), open in diastole (v grows downwards).
    r_ao = p.aortic_radius_cm
    m = tl["mv_open"].astype(np.float64)
    hinge_a = np.array([-0.2, r_ao + 0.15])
    ang_a = np.deg2rad(112 + 60 * m)
    tip_a = hinge_a + 2.1 * (p.lv_half_width_cm / 2.35) * np.stack([np.cos(ang_a), np.sin(ang_a)], axis=1)
    hinge_p = np.array([0.3, lv_bottom - 0.4])
    ang_p = np.deg2rad(-150 + 55 * m)
    tip_p = hinge_p + 1.1 * np.stack([np.cos(ang_p), np.sin(ang_p)], axis=1)
    for hinge, tip in ((hinge_a, tip_a), (hinge_p, tip_p)):
        _add_segment(refl, vp, tl, grid, np.broadcast_to(hinge, tip.shape), tip, 0.18, 1.0)

    # Aortic valve: the only place the label reaches.
    for hinge, tip in _leaflets(vp, tl):
        _add_segment(refl, vp, tl, grid, hinge, tip, p.leaflet_cm, p.leaflet_reflectivity * vp.valve_visibility)
    return refl


def _psf_half(sigma: float) -> int:
    """Half-length in pixels of the point-spread kernel of ``sigma`` pixels."""
    return max(1, int(math.ceil(2.5 * sigma)))


def _psf_kernel(sigma: float) -> np.ndarray:
    """1-D Gaussian kernel with unit energy (sum of squares 1), so blurred unit-variance
    white noise keeps unit variance."""
    half = _psf_half(sigma)
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / np.sqrt((k**2).sum())).astype(np.float32)


def render_video(vp: VideoParams, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Render one video: ``(frames, valve_box)``.

    ``frames`` is ``(T, H, W)`` uint8 (``T = vp.n_frames``, ``H = W = vp.size``), exactly 0
    outside the sector; ``valve_box`` is ``(x0, y0, x1, y1)`` in pixels, half-open, the
    aortic valve's extent over all frames (see ``valve_box``). Noise comes from ``rng``.
    """
    n, t_len = vp.size, vp.n_frames
    tl = cardiac_timeline(vp)
    shift = _motion_px(vp, tl)
    grid = _grid(vp, pad=int(np.ceil(np.abs(shift).max())) + 2)
    refl = _reflectivity(vp, tl, grid, shift)

    ax, ay = _apex(vp)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r_cm = np.sqrt((xx - _f32(ax)) ** 2 + (yy - _f32(ay)) ** 2) / _f32(vp.px_per_cm)
    refl *= np.exp(_f32(vp.attenuation_per_cm) * r_cm) * (1.0 + 2.5 * np.exp(-r_cm / _f32(0.6)))  # near-field clutter
    refl += _f32(vp.noise_floor)

    # Speckle: complex noise fixed to the tissue (it moves with the heart, to the nearest
    # pixel) that evolves as an AR(1) process, x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t, so its
    # frame-to-frame correlation decays as rho ** lag; times sqrt(reflectivity), blurred by
    # the point-spread function; ``_LOOKS`` such fields are summed in power.
    side = n + 2 * grid.pad
    rho = _f32(vp.speckle_memory)
    renew = _f32(math.sqrt(1.0 - vp.speckle_memory**2))
    tex = np.empty((t_len, _LOOKS * 2, side, side), dtype=np.float32)
    tex[0] = rng.standard_normal((_LOOKS * 2, side, side), dtype=np.float32)
    for t in range(1, t_len):
        np.multiply(tex[t - 1], rho, out=tex[t])
        tex[t] += renew * rng.standard_normal((_LOOKS * 2, side, side), dtype=np.float32)
    speckle = np.stack([_shifted(tex[t], grid.pad, shift[t : t + 1], n, linear=False)[0] for t in range(t_len)])
    amp = np.sqrt(refl * _f32(0.5 / _LOOKS))[:, None]
    kx, ky = _psf_kernel(vp.psf_lateral_px), _psf_kernel(vp.psf_axial_px)
    power = np.zeros_like(refl)
    for look in range(_LOOKS):
        f = speckle[:, 2 * look : 2 * look + 2] * amp
        f = ndimage.correlate1d(f, kx, axis=3, mode="nearest")
        f = ndimage.correlate1d(f, ky, axis=2, mode="nearest")
        f *= f
        power += f[:, 0] + f[:, 1]

    level = (_f32(10.0) * np.log10(np.maximum(power, _f32(1e-10))) + _f32(vp.gain_db + 24.0)) / _f32(vp.dynamic_range_db)
    frames = np.clip(level * _f32(255.0) + _f32(0.5), 0, 255).astype(np.uint8)
    frames *= sector_mask(n, ax, ay, vp.radius, vp.half_angle_deg)[None]
    return frames, valve_box(vp)


def _video_name(seed: int, patient: int, video: int) -> str:
    """Opaque object name: no patient or study identifier in it."""
    return "videos/" + hashlib.sha256(f"echo-synth:{seed}:{patient}:{video}".encode()).hexdigest()[:20] + ".mp4"


@dataclass(frozen=True)
class _Job:
    cfg: SynthConfig
    patient: PatientParams
    video: int
    split: str


def _videos_per_study(seed: int, index: int) -> int:
    rng = np.random.default_rng([seed, index, _ANATOMY, 1])
    return int(rng.choice(len(_VIDEOS_PER_STUDY_P), p=_VIDEOS_PER_STUDY_P)) + 1


def _jobs(cfg: SynthConfig) -> Iterator[_Job]:
    labels, splits = assign_labels_and_splits(cfg)
    for index, (label, split) in enumerate(zip(labels, splits)):
        patient = sample_patient(cfg.seed, index, label, cfg.difficulty)
        for video in range(_videos_per_study(cfg.seed, index)):
            yield _Job(cfg, patient, video, split)


def _make_video(job: _Job) -> dict[str, str]:
    """Render, encode and store one video; returns its manifest row."""
    cfg, p = job.cfg, job.patient
    rng = np.random.default_rng([cfg.seed, p.index, job.video])
    vp = sample_video(p, rng, cfg.size, cfg.fps, cfg.min_frames, cfg.max_frames, sample_study(cfg.seed, p.index),
                      cfg.view_jitter)
    frames, box = render_video(vp, rng)
    name = _video_name(cfg.seed, p.index, job.video)
    storage.write_bytes(storage.join(cfg.out, name), encode_mp4(frames, cfg.fps))
    ax, ay = _apex(vp)
    labelled = job.split != "unlabeled"
    return {
        "video_uri": name,
        "patient_id": f"P{p.index:06d}",
        "study_id": f"S{p.index:06d}",
        "split": job.split,
        "label": str(p.label) if labelled else "",
        "n_frames": str(vp.n_frames),
        "fps": f"{cfg.fps:g}",
        "valve_x0": str(box[0]), "valve_y0": str(box[1]), "valve_x1": str(box[2]), "valve_y1": str(box[3]),
        "view_angle_deg": f"{vp.angle_deg:.2f}",
        "depth_cm": f"{vp.depth_cm:.2f}",
        "gain_db": f"{vp.gain_db:.2f}",
        "heart_rate_bpm": f"{vp.heart_rate_bpm:.1f}",
        "sector_apex_x": f"{ax:.2f}",
        "sector_apex_y": f"{ay:.2f}",
        "sector_radius": f"{vp.radius:.2f}",
        "sector_half_angle_deg": f"{vp.half_angle_deg:.2f}",
        "valve_severity": f"{p.severity:.4f}" if labelled else "",
    }


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` while this process has a single thread (quick, and needs no importable
    ``__main__``); ``spawn`` otherwise, because forking a threaded process can deadlock."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def synthesize(out: str, patients: int, seed: int, *, prevalence: float = 0.15,
               splits: tuple[float, float, float] = (0.7, 0.1, 0.2), unlabeled_patients: int = 0,
               size: int = 112, fps: float = 30.0, min_frames: int = 48, max_frames: int = 96,
               difficulty: float = 1.0, view_jitter: str = "moderate", workers: int = 1) -> str:
    """Write a synthetic PLAX data set under ``out`` (local folder or ``s3://`` prefix).

    Videos go to ``out/videos/<hash>.mp4`` (H.264, ``size`` x ``size``, ``fps`` frames per
    second); ``out/manifest.csv`` is written last, with one row per video (columns
    ``MANIFEST_COLUMNS``; ``video_uri`` relative to the manifest). ``view_jitter`` is how much a
    study's videos differ in acquisition (``VIEW_JITTER``). ``workers`` > 1 renders in that
    many processes. Returns the manifest's URI.
    """
    cfg = SynthConfig(out=out, patients=patients, seed=seed, prevalence=prevalence, splits=tuple(splits),
                      unlabeled_patients=unlabeled_patients, size=size, fps=fps, min_frames=min_frames,
                      max_frames=max_frames, difficulty=difficulty, view_jitter=view_jitter, workers=workers)
    jobs = list(_jobs(cfg))
    start = time.perf_counter()
    if cfg.workers == 1:
        rows = [_make_video(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=_pool_context()) as pool:
            rows = list(pool.map(_make_video, jobs, chunksize=max(1, len(jobs) // (8 * cfg.workers))))
    elapsed = time.perf_counter() - start
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    uri = storage.join(cfg.out, "manifest.csv")
    storage.write_bytes(uri, buf.getvalue().encode())
    log.info("synthesized %d videos of %d patients in %.1f s (%.1f videos/s, %d worker(s)) -> %s",
             len(rows), cfg.patients + cfg.unlabeled_patients, elapsed, len(rows) / max(elapsed, 1e-9), cfg.workers, uri)
    return uri


def save_example_frames(out_dir: str | Path, seed: int = 2, size: int = 112) -> list[Path]:
    """Write ``synth-not-severe.png`` and ``synth-severe.png`` into ``out_dir``: one frame at
    peak systole (valve open) from a not-severe and a severe video that differ only in the
    label (same anatomy, view and noise). Returns the two paths."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, name in ((0, "synth-not-severe.png"), (1, "synth-severe.png")):
        patient = sample_patient(seed, 0, label)
        rng = np.random.default_rng([seed, 0, 0])
        vp = sample_video(patient, rng, size=size, min_frames=48, max_frames=48, study=sample_study(seed, 0),
                          view_jitter="moderate")
        frames, _ = render_video(vp, rng)
        peak = int(np.argmax(cardiac_timeline(vp)["av_open"]))
        path = out / name
        Image.fromarray(frames[peak]).save(path, optimize=True)
        paths.append(path)
    return paths
