"""Deterministic generator for the embedded sample data set.

Every item is a synthetic image, video or audio clip described by a small closed vocabulary (shape, colour,
position, motion, pitch, pattern), so that tiny models trained on the sample can learn to tell a matching caption
from a mismatched one. A share of the rows carry injected defects, recorded in ``labels.parquet``.

Counting rule: ``n_image``/``n_video``/``n_audio`` are the numbers of *clean* items; defective rows are added on
top. Each defect gets at least 3 rows per modality; the three caption defects get at least ``min(15, n // 3)`` so
that per-modality recall can be measured on them.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

GENERATOR_VERSION = "1.0"

DEFECTS = (
    "exact_duplicate",
    "near_duplicate",
    "mismatched_caption",
    "gibberish_caption",
    "non_english_caption",
    "corrupt_file",
    "truncated_file",
    "dead_url",
    "slow_url",
    "oversized_file",
)
CAPTION_DEFECTS = ("mismatched_caption", "gibberish_caption", "non_english_caption")
DUPLICATE_DEFECTS = ("exact_duplicate", "near_duplicate")
# URL-only defects: no file on disk, the server synthesises the response under this route.
URL_DEFECT_ROUTES = {"dead_url": "dead", "slow_url": "slow", "oversized_file": "oversized"}

MODALITIES = ("image", "video", "audio")
ID_PREFIX = {"image": "img", "video": "vid", "audio": "aud"}

# The crawl reason a strict prober reports for each file/URL defect; caption and duplicate defects crawl fine.
# Corrupt files are pure random bytes with no magic (and no 0xFF, so no JPEG marker or MPEG sync word): the prober
# cannot take them for the medium at all, hence "not_an_image" / "not_a_video" / "not_an_audio", never
# "decode_error".
EXPECTED_CRAWL_REASON = {
    "dead_url": "http_404",
    "slow_url": "timeout",
    "oversized_file": "too_large",
    "truncated_file": "truncated",
}
NOT_A_MEDIUM = {"image": "not_an_image", "video": "not_a_video", "audio": "not_an_audio"}


def expected_crawl_reason(defect: str | None, modality: str) -> str | None:
    """The crawl ledger reason a row should get, or None if the crawl should keep it."""
    if defect == "corrupt_file":
        return NOT_A_MEDIUM[modality]
    return EXPECTED_CRAWL_REASON.get(defect) if defect else None


LABELS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("modality", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("defect", pa.string()),
        ("dup_of", pa.string()),
        ("expected_crawl_reason", pa.string()),
        ("clean_caption_ok", pa.bool_()),
        ("true_caption", pa.string()),
        ("attrs", pa.string()),
    ]
)

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 190),
    "orange": (250, 135, 10),
}
# Greyscale images can only show these; they are never used for colour images.
GRAY_COLORS = {"white": (245, 245, 245), "black": (15, 15, 15)}
BACKGROUNDS = {"white": 236, "black": 24, "gray": 128}
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.34, "large": 0.52}  # shape extent as a fraction of the shorter side
MOTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
PITCHES = {"low": (150.0, 250.0), "mid": (450.0, 800.0), "high": (1500.0, 2600.0)}
TONE_PATTERNS = ("steady", "rising", "falling", "beeps2", "beeps3")
NOISE_PATTERNS = ("steady", "pulses3")
SWEEP_RATIO = 1.6

_MOTION_EN = {
    "left_to_right": ("from left to right", "to the right", "rightward"),
    "right_to_left": ("from right to left", "to the left", "leftward"),
    "top_to_bottom": ("from top to bottom", "downward", "down"),
    "bottom_to_top": ("from bottom to top", "upward", "up"),
}
_PITCH_EN = {
    "low": ("low", "low-pitched", "deep"),
    "mid": ("medium-pitched", "mid-range"),
    "high": ("high", "high-pitched"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pos_phrase(pos: str, rng: np.random.Generator) -> str:
    if pos == "center":
        return str(rng.choice(["in the center", "in the middle"]))
    return str(rng.choice([f"in the {pos}", f"in the {pos} corner"]))


def image_caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """English caption for image attributes; ``rng=None`` gives the canonical phrasing."""
    color, shape, bg, size = attrs["color"], attrs["shape"], attrs["bg"], attrs["size"]
    if rng is None:
        return f"{_article(size)} {size} {color} {shape} in the {attrs['position']} on {_article(bg)} {bg} background"
    adjectives = f"{size} {color}" if rng.random() < 0.5 else color
    np_ = f"{_article(adjectives)} {adjectives} {shape}"
    pos = _pos_phrase(attrs["position"], rng)
    templates = (
        f"{np_} {pos} on {_article(bg)} {bg} background",
        f"{np_} on {_article(bg)} {bg} background, {pos}",
        f"an image of {np_} {pos}",
        f"{np_} {pos}, {bg} background",
        f"{_article(bg)} {bg} background with {np_} {pos}",
        f"a picture of {np_} {pos} against {_article(bg)} {bg} background",
    )
    return templates[int(rng.integers(len(templates)))]


def video_caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """English caption for video attributes; ``rng=None`` gives the canonical phrasing."""
    color, shape, bg = attrs["color"], attrs["shape"], attrs["bg"]
    np_ = f"{_article(color)} {color} {shape}"
    phrases = _MOTION_EN[attrs["motion"]]
    if rng is None:
        return f"{np_} moving {phrases[0]} on {_article(bg)} {bg} background"
    mp = phrases[int(rng.integers(len(phrases)))]
    templates = (
        f"{np_} moving {mp}",
        f"{np_} moving {mp} on {_article(bg)} {bg} background",
        f"a video of {np_} moving {mp}",
        f"{np_} sliding {mp} across {_article(bg)} {bg} background",
        f"a clip of {np_} that moves {mp}",
    )
    return templates[int(rng.integers(len(templates)))]


def audio_caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """English caption for audio attributes; ``rng=None`` gives the canonical phrasing."""
    pattern = attrs["pattern"]
    if attrs["kind"] == "noise":
        options = {
            "steady": ("steady white noise", "a burst of white noise", "a hiss of static noise"),
            "pulses3": ("white noise pulsing three times", "three short bursts of noise", "three bursts of static"),
        }[pattern]
        return options[0] if rng is None else options[int(rng.integers(len(options)))]
    words = _PITCH_EN[attrs["pitch"]]
    p = words[0] if rng is None else words[int(rng.integers(len(words)))]
    options = {
        "steady": (f"a steady {p} tone", f"a {p} tone held constant", f"a continuous {p} tone"),
        "rising": (f"a {p} tone rising in pitch", f"a {p} sweep going up", f"a {p} tone that rises"),
        "falling": (f"a {p} tone falling in pitch", f"a {p} sweep going down", f"a {p} tone that falls"),
        "beeps2": (f"a {p} beep repeated twice", f"two short {p} beeps", f"a {p} tone beeping two times"),
        "beeps3": (f"a {p} beep repeated three times", f"three short {p} beeps", f"a {p} tone beeping three times"),
    }[pattern]
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


CAPTIONERS: dict[str, Callable[[dict, np.random.Generator | None], str]] = {
    "image": image_caption,
    "video": video_caption,
    "audio": audio_caption,
}

# ---------------------------------------------------------------------------------------------------------------
# Non-English captions: real sentences built from small per-language dictionaries, with gender agreement.
# ---------------------------------------------------------------------------------------------------------------

# shape -> (noun, gender); colour -> (masculine/neuter form, feminine form) or German adjective stem
_FOREIGN = {
    "de": {
        "shape": {
            "circle": ("Kreis", "m"),
            "square": ("Quadrat", "n"),
            "triangle": ("Dreieck", "n"),
            "star": ("Stern", "m"),
        },
        "color": {
            "red": "rot",
            "green": "grün",
            "blue": "blau",
            "yellow": "gelb",
            "purple": "violett",
            "orange": "orangefarben",
            "white": "weiß",
            "black": "schwarz",
        },
        "bg": {"white": "weißem", "black": "schwarzem", "gray": "grauem"},
        "pos": {
            "top left": "oben links",
            "top right": "oben rechts",
            "bottom left": "unten links",
            "bottom right": "unten rechts",
            "center": "in der Mitte",
        },
        "motion": {
            "left_to_right": "von links nach rechts",
            "right_to_left": "von rechts nach links",
            "top_to_bottom": "von oben nach unten",
            "bottom_to_top": "von unten nach oben",
        },
        "pitch": {"low": "tiefer", "mid": "mittelhoher", "high": "hoher"},
        "pattern": {
            "steady": "der gleich bleibt",
            "rising": "der immer höher wird",
            "falling": "der immer tiefer wird",
            "beeps2": "der zweimal kurz ertönt",
            "beeps3": "der dreimal kurz ertönt",
        },
        "noise": {"steady": "Gleichmäßiges weißes Rauschen", "pulses3": "Weißes Rauschen in drei kurzen Stößen"},
    },
    "fr": {
        "shape": {
            "circle": ("cercle", "m"),
            "square": ("carré", "m"),
            "triangle": ("triangle", "m"),
            "star": ("étoile", "f"),
        },
        "color": {
            "red": ("rouge", "rouge"),
            "green": ("vert", "verte"),
            "blue": ("bleu", "bleue"),
            "yellow": ("jaune", "jaune"),
            "purple": ("violet", "violette"),
            "orange": ("orange", "orange"),
            "white": ("blanc", "blanche"),
            "black": ("noir", "noire"),
        },
        "bg": {"white": "blanc", "black": "noir", "gray": "gris"},
        "pos": {
            "top left": "en haut à gauche",
            "top right": "en haut à droite",
            "bottom left": "en bas à gauche",
            "bottom right": "en bas à droite",
            "center": "au centre",
        },
        "motion": {
            "left_to_right": "de gauche à droite",
            "right_to_left": "de droite à gauche",
            "top_to_bottom": "de haut en bas",
            "bottom_to_top": "de bas en haut",
        },
        "pitch": {"low": "grave", "mid": "de hauteur moyenne", "high": "aigu"},
        "pattern": {
            "steady": "continu",
            "rising": "qui monte",
            "falling": "qui descend",
            "beeps2": "répété deux fois",
            "beeps3": "répété trois fois",
        },
        "noise": {"steady": "Un bruit blanc continu", "pulses3": "Un bruit blanc en trois courtes rafales"},
    },
    "es": {
        "shape": {
            "circle": ("círculo", "m"),
            "square": ("cuadrado", "m"),
            "triangle": ("triángulo", "m"),
            "star": ("estrella", "f"),
        },
        "color": {
            "red": ("rojo", "roja"),
            "green": ("verde", "verde"),
            "blue": ("azul", "azul"),
            "yellow": ("amarillo", "amarilla"),
            "purple": ("morado", "morada"),
            "orange": ("naranja", "naranja"),
            "white": ("blanco", "blanca"),
            "black": ("negro", "negra"),
        },
        "bg": {"white": "blanco", "black": "negro", "gray": "gris"},
        "pos": {
            "top left": "arriba a la izquierda",
            "top right": "arriba a la derecha",
            "bottom left": "abajo a la izquierda",
            "bottom right": "abajo a la derecha",
            "center": "en el centro",
        },
        "motion": {
            "left_to_right": "de izquierda a derecha",
            "right_to_left": "de derecha a izquierda",
            "top_to_bottom": "de arriba abajo",
            "bottom_to_top": "de abajo arriba",
        },
        "pitch": {"low": "grave", "mid": "medio", "high": "agudo"},
        "pattern": {
            "steady": "constante",
            "rising": "que sube de tono",
            "falling": "que baja de tono",
            "beeps2": "que se repite dos veces",
            "beeps3": "que se repite tres veces",
        },
        "noise": {"steady": "Ruido blanco constante", "pulses3": "Ruido blanco en tres ráfagas cortas"},
    },
    "it": {
        "shape": {
            "circle": ("cerchio", "m"),
            "square": ("quadrato", "m"),
            "triangle": ("triangolo", "m"),
            "star": ("stella", "f"),
        },
        "color": {
            "red": ("rosso", "rossa"),
            "green": ("verde", "verde"),
            "blue": ("blu", "blu"),
            "yellow": ("giallo", "gialla"),
            "purple": ("viola", "viola"),
            "orange": ("arancione", "arancione"),
            "white": ("bianco", "bianca"),
            "black": ("nero", "nera"),
        },
        "bg": {"white": "bianco", "black": "nero", "gray": "grigio"},
        "pos": {
            "top left": "in alto a sinistra",
            "top right": "in alto a destra",
            "bottom left": "in basso a sinistra",
            "bottom right": "in basso a destra",
            "center": "al centro",
        },
        "motion": {
            "left_to_right": "da sinistra a destra",
            "right_to_left": "da destra a sinistra",
            "top_to_bottom": "dall'alto verso il basso",
            "bottom_to_top": "dal basso verso l'alto",
        },
        "pitch": {"low": "grave", "mid": "medio", "high": "acuto"},
        "pattern": {
            "steady": "costante",
            "rising": "che sale",
            "falling": "che scende",
            "beeps2": "ripetuto due volte",
            "beeps3": "ripetuto tre volte",
        },
        "noise": {"steady": "Rumore bianco costante", "pulses3": "Rumore bianco in tre brevi raffiche"},
    },
}
LANGUAGES = tuple(_FOREIGN)


def _foreign_noun_phrase(lang: str, shape: str, color: str) -> str:
    d = _FOREIGN[lang]
    noun, gender = d["shape"][shape]
    if lang == "de":
        return f"Ein {d['color'][color]}{'er' if gender == 'm' else 'es'} {noun}"
    forms = d["color"][color]
    adj = forms[1] if gender == "f" else forms[0]
    article = {"fr": ("un", "une"), "es": ("un", "una"), "it": ("un", "una")}[lang][gender == "f"]
    return f"{article[0].upper()}{article[1:]} {noun} {adj}"


def foreign_caption(modality: str, attrs: dict, lang: str) -> str:
    """A caption in ``lang`` (de/fr/es/it) that describes ``attrs`` correctly."""
    d = _FOREIGN[lang]
    if modality == "image":
        np_ = _foreign_noun_phrase(lang, attrs["shape"], attrs["color"])
        pos, bg = d["pos"][attrs["position"]], d["bg"][attrs["bg"]]
        return {
            "de": f"{np_} {pos} auf {bg} Hintergrund",
            "fr": f"{np_} {pos} sur fond {bg}",
            "es": f"{np_} {pos} sobre fondo {bg}",
            "it": f"{np_} {pos} su sfondo {bg}",
        }[lang]
    if modality == "video":
        np_ = _foreign_noun_phrase(lang, attrs["shape"], attrs["color"])
        motion = d["motion"][attrs["motion"]]
        return {
            "de": f"{np_} bewegt sich {motion}",
            "fr": f"{np_} qui se déplace {motion}",
            "es": f"{np_} que se mueve {motion}",
            "it": f"{np_} che si muove {motion}",
        }[lang]
    if attrs["kind"] == "noise":
        return d["noise"][attrs["pattern"]]
    pitch, pattern = d["pitch"][attrs["pitch"]], d["pattern"][attrs["pattern"]]
    return {
        "de": f"Ein {pitch} Ton, {pattern}",
        "fr": f"Un son {pitch} {pattern}",
        "es": f"Un tono {pitch} {pattern}",
        "it": f"Un suono {pitch} {pattern}",
    }[lang]


# ---------------------------------------------------------------------------------------------------------------
# Gibberish captions
# ---------------------------------------------------------------------------------------------------------------

_SALAD = (
    "carburetor whisper seventeen although potato invoice gently beneath telescope marmalade quarterly spoon "
    "nevertheless umbrella cathedral vinegar ambiguous pillow thunder accordion recipe otherwise galaxy lettuce "
    "bureaucracy candle hiccup tomorrow walrus ledger velvet incidentally marathon kettle philosophy cucumber "
    "saxophone regarding tapestry mortgage penguin hydrant biscuit forty lantern syllable orchestra gravel"
).split()
_KEYS_HOME = "asdfghjkl"
_KEYS_ALL = "qwertyuiopasdfghjklzxcvbnm"
_SYMBOLS = "qwertyuiopasdfghjklzxcvbnm0123456789!@#$%^&*()_+=-~<>?/|"


def gibberish_caption(rng: np.random.Generator) -> str:
    """Keyboard mash, symbol soup or word salad."""
    style = int(rng.integers(3))
    if style == 0:
        tokens = []
        for _ in range(int(rng.integers(3, 8))):
            keys = _KEYS_HOME if rng.random() < 0.6 else _KEYS_ALL
            tokens.append("".join(rng.choice(list(keys), size=int(rng.integers(3, 11)))))
        return " ".join(tokens)
    if style == 1:
        chars = rng.choice(list(_SYMBOLS + "    "), size=int(rng.integers(15, 41)))
        text = "".join(chars).strip()
        return text or "#@!zq"
    words = rng.choice(_SALAD, size=int(rng.integers(6, 13)), replace=False)
    return " ".join(str(w) for w in words)


# ---------------------------------------------------------------------------------------------------------------
# Attribute sampling
# ---------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options, p=None) -> Any:
    return options[int(rng.choice(len(options), p=p))]


def _sample_image_attrs(rng: np.random.Generator) -> dict:
    ext = _pick(rng, ("png", "jpg", "webp"), p=(0.45, 0.45, 0.10))
    modes = {
        "png": (("RGB", "RGBA", "L", "P"), (0.55, 0.15, 0.10, 0.20)),
        "jpg": (("RGB", "L"), (0.88, 0.12)),
        "webp": (("RGB", "RGBA"), (0.7, 0.3)),
    }[ext]
    mode = _pick(rng, modes[0], p=modes[1])
    aspect = _pick(
        rng,
        (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 4.0, 0.25),
        p=(0.3, 0.12, 0.12, 0.1, 0.1, 0.07, 0.07, 0.06, 0.06),
    )
    ratio = max(aspect, 1 / aspect)
    long_side = int(rng.integers(math.ceil(64 * ratio), 513))
    short_side = max(64, round(long_side / ratio))
    width, height = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
    if mode == "L":
        color = _pick(rng, tuple(GRAY_COLORS))
        bg = _pick(rng, ("gray", "black")) if color == "white" else _pick(rng, ("gray", "white"))
    else:
        color = _pick(rng, tuple(COLORS))
        bg = _pick(rng, tuple(BACKGROUNDS))
    return {
        "shape": _pick(rng, SHAPES),
        "color": color,
        "position": _pick(rng, tuple(POSITIONS)),
        "size": _pick(rng, tuple(SIZES)),
        "bg": bg,
        "width": width,
        "height": height,
        "mode": mode,
        "format": ext,
    }


def _sample_video_attrs(rng: np.random.Generator) -> dict:
    width, height = _pick(rng, ((64, 64), (96, 96), (128, 128), (128, 96), (96, 128), (112, 64), (128, 72)))
    codec = _pick(rng, ("libx264", "mpeg4", "libvpx", "libvpx-vp9"), p=(0.6, 0.15, 0.15, 0.10))
    return {
        "shape": _pick(rng, SHAPES),
        "color": _pick(rng, tuple(COLORS)),
        "motion": _pick(rng, MOTIONS),
        "bg": _pick(rng, tuple(BACKGROUNDS)),
        "width": width,
        "height": height,
        "frames": int(rng.integers(8, 25)),
        "fps": _pick(rng, (8, 12)),
        "codec": codec,
        "format": "webm" if codec.startswith("libvpx") else "mp4",
    }


def _sample_audio_attrs(rng: np.random.Generator) -> dict:
    kind = "noise" if rng.random() < 0.2 else "tone"
    return {
        "kind": kind,
        "pitch": _pick(rng, tuple(PITCHES)) if kind == "tone" else None,
        "pattern": _pick(rng, NOISE_PATTERNS if kind == "noise" else TONE_PATTERNS),
        "sample_rate": _pick(rng, (16000, 22050, 44100), p=(0.7, 0.15, 0.15)),
        "channels": 2 if rng.random() < 0.15 else 1,
        "format": "wav" if rng.random() < 0.6 else "flac",
    }


_ATTR_SAMPLERS = {"image": _sample_image_attrs, "video": _sample_video_attrs, "audio": _sample_audio_attrs}


def _mismatched_attrs(modality: str, attrs: dict, rng: np.random.Generator) -> dict:
    """Attributes that differ from ``attrs`` in every content dimension a caption names prominently."""
    out = dict(attrs)
    if modality in ("image", "video"):
        out["shape"] = _pick(rng, tuple(s for s in SHAPES if s != attrs["shape"]))
        out["color"] = _pick(rng, tuple(c for c in COLORS if c != attrs["color"]))
        if modality == "image":
            out["position"] = _pick(rng, tuple(p for p in POSITIONS if p != attrs["position"]))
        else:
            out["motion"] = _pick(rng, tuple(m for m in MOTIONS if m != attrs["motion"]))
        return out
    if attrs["kind"] == "noise":
        out.update(kind="tone", pitch=_pick(rng, tuple(PITCHES)), pattern=_pick(rng, TONE_PATTERNS))
    elif rng.random() < 0.25:
        out.update(kind="noise", pitch=None, pattern=_pick(rng, NOISE_PATTERNS))
    else:
        out["pitch"] = _pick(rng, tuple(p for p in PITCHES if p != attrs["pitch"]))
        out["pattern"] = _pick(rng, tuple(p for p in TONE_PATTERNS if p != attrs["pattern"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int, level: int) -> np.ndarray:
    """Neutral background with faint smooth mottling, so items with equal attributes are not near-duplicates."""
    # a coarse random grid upsampled smoothly: varies at the scale perceptual hashes look at (about 1/8 image)
    grid = rng.uniform(-14.0, 14.0, size=(4, 4)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    gray = np.clip(level + field_, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [r * 1.0] * 4
    elif shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [r * 1.15] * 3
    else:  # star
        angles, radii = [-90 + 36 * k for k in range(10)], [r * (1.15 if k % 2 == 0 else 0.5) for k in range(10)]
    return [
        (cx + rr * math.cos(math.radians(a + rot)), cy + rr * math.sin(math.radians(a + rot)))
        for a, rr in zip(angles, radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=fill)


def _jitter_color(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-12, 13, size=3), 0, 255))


def render_image(attrs: dict, rng: np.random.Generator) -> Image.Image:
    """Draw one image in the mode named by ``attrs``."""
    w, h = attrs["width"], attrs["height"]
    canvas = Image.fromarray(_background(rng, w, h, BACKGROUNDS[attrs["bg"]]))
    m = min(w, h)
    r = SIZES[attrs["size"]] * m / 2 * rng.uniform(0.9, 1.1)
    px, py = POSITIONS[attrs["position"]]
    cx = float(np.clip(px * w + rng.uniform(-0.05, 0.05) * m, r + 1, w - r - 1))
    cy = float(np.clip(py * h + rng.uniform(-0.05, 0.05) * m, r + 1, h - r - 1))
    rot = float(rng.uniform(-15, 15))
    rgb = {**COLORS, **GRAY_COLORS}[attrs["color"]]
    _draw_shape(ImageDraw.Draw(canvas), attrs["shape"], cx, cy, r, rot, _jitter_color(rng, rgb))
    mode = attrs["mode"]
    if mode == "RGBA":
        # WebP drops an all-opaque alpha channel, so give those a translucent background
        opaque = attrs["format"] != "webp" and rng.random() < 0.5
        alpha = Image.new("L", (w, h), 255 if opaque else 230)
        _draw_shape(ImageDraw.Draw(alpha), attrs["shape"], cx, cy, r, rot, 255)
        canvas.putalpha(alpha)
    elif mode == "L":
        canvas = canvas.convert("L")
    elif mode == "P":
        canvas = canvas.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return canvas


def encode_image(img: Image.Image, fmt: str, rng: np.random.Generator, quality: int | None = None) -> bytes:
    """Encode with fixed options: none of these encoders embed timestamps, so output is byte-reproducible."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    elif fmt == "jpg":
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        q = quality if quality is not None else int(rng.integers(75, 96))
        img.save(buf, "JPEG", quality=q, subsampling=int(rng.choice([0, 2])), progressive=bool(rng.random() < 0.2))
    elif fmt == "webp":
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        img.save(buf, "WEBP", quality=int(rng.integers(70, 91)), method=4, lossless=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def render_video_frames(attrs: dict, rng: np.random.Generator) -> list[np.ndarray]:
    """RGB frames of one shape crossing the frame in the direction named by ``attrs``."""
    w, h, n = attrs["width"], attrs["height"], attrs["frames"]
    bg = _background(rng, w, h, BACKGROUNDS[attrs["bg"]])
    r = 0.2 * min(w, h) * rng.uniform(0.9, 1.1)
    rot = float(rng.uniform(-15, 15))
    fill = _jitter_color(rng, COLORS[attrs["color"]])
    motion = attrs["motion"]
    horizontal = motion in ("left_to_right", "right_to_left")
    span = w if horizontal else h
    start, end = r + 1, span - r - 1
    if motion in ("right_to_left", "bottom_to_top"):
        start, end = end, start
    across = (h if horizontal else w) * (0.5 + rng.uniform(-0.15, 0.15))
    frames = []
    for i in range(n):
        along = start + (end - start) * i / max(n - 1, 1)
        cx, cy = (along, across) if horizontal else (across, along)
        img = Image.fromarray(bg)
        _draw_shape(ImageDraw.Draw(img), attrs["shape"], cx, cy, r, rot, fill)
        frames.append(np.asarray(img))
    return frames


def _video_options(codec: str, quality: str) -> dict[str, str]:
    """Fixed encoder options; ``quality`` is "normal" or "low" (near-duplicate re-encodes)."""
    low = quality == "low"
    if codec == "libx264":
        # mb-tree reads uninitialised memory on these tiny frames: with it on, ~1 encode in 100 differed run to run
        return {"preset": "veryfast", "crf": "34" if low else "23", "x264-params": "mbtree=0", "flags": "+bitexact"}
    if codec == "mpeg4":
        return {"b": "120k" if low else "600k", "flags": "+bitexact"}
    # "good" rather than "realtime": realtime mode adapts its speed to the wall clock, so its bytes vary run to run
    return {"b": "150k" if low else "600k", "deadline": "good", "cpu-used": "5", "flags": "+bitexact"}


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range conversion in numpy, stacked Y/U/V planes as PyAV's yuv420p ``from_ndarray`` wants.

    Converting here rather than in swscale keeps the encoder's input the same on every machine: swscale's SIMD
    paths, picked per CPU, round differently from its C path.
    """
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).ravel() for p in (y, sub(u), sub(v))]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def encode_video(frames: list[np.ndarray], fps: int, codec: str, fmt: str, quality: str = "normal") -> bytes:
    """Encode RGB frames single-threaded with bitexact flags so the bytes are reproducible."""
    import av

    h, w = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        # +faststart puts the index first (as on the web), so a truncated mp4 still opens and decodes part-way;
        # it needs a real file because the muxer re-reads its output.
        path = Path(tmp) / f"clip.{fmt}"
        copts = {"fflags": "+bitexact"}
        if fmt == "mp4":
            copts["movflags"] = "+faststart"
        with av.open(str(path), "w", format=fmt, container_options=copts) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = _video_options(codec, quality)
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(_rgb_to_yuv420p(arr), format="yuv420p")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return path.read_bytes()


def _yuv420p_to_rgb(yuv: np.ndarray) -> np.ndarray:
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    flat = yuv.ravel()
    y = flat[: h * w].reshape(h, w).astype(np.float32) - 16.0
    u = flat[h * w : h * w * 5 // 4].reshape(h // 2, w // 2).astype(np.float32) - 128.0
    v = flat[h * w * 5 // 4 :].reshape(h // 2, w // 2).astype(np.float32) - 128.0
    u, v = (c.repeat(2, axis=0).repeat(2, axis=1) for c in (u, v))
    rgb = np.stack([1.164 * y + 1.596 * v, 1.164 * y - 0.392 * u - 0.813 * v, 1.164 * y + 2.017 * u], axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def decode_video_frames(data: bytes) -> list[np.ndarray]:
    """All frames of a clip as RGB arrays (converted in numpy when possible, for the reason in _rgb_to_yuv420p)."""
    import av

    out = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
                out.append(_yuv420p_to_rgb(frame.to_ndarray()))
            else:
                out.append(frame.to_ndarray(format="rgb24"))
    return out


def render_audio(attrs: dict, rng: np.random.Generator) -> np.ndarray:
    """Float32 samples, shape (n,) or (n, 2), in [-1, 1]."""
    sr = attrs["sample_rate"]
    pattern = attrs["pattern"]
    amp = rng.uniform(0.25, 0.6)
    if pattern in ("beeps2", "beeps3", "pulses3"):
        k = 2 if pattern == "beeps2" else 3
        on, off = rng.uniform(0.12, 0.22), rng.uniform(0.10, 0.20)
        lead, tail = rng.uniform(0.05, 0.15), rng.uniform(0.15, 0.3)
        duration = lead + k * on + (k - 1) * off + tail
        gate_spans = [(lead + i * (on + off), lead + i * (on + off) + on) for i in range(k)]
    else:
        duration = rng.uniform(0.5, 3.0)
        gate_spans = [(0.0, duration)]
    n = int(round(duration * sr))
    t = np.arange(n, dtype=np.float64) / sr
    if attrs["kind"] == "noise":
        signal = rng.standard_normal(n) * 0.35
    else:
        lo, hi = PITCHES[attrs["pitch"]]
        fc = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        half = math.sqrt(SWEEP_RATIO)
        if pattern == "rising":
            freq = fc / half * (SWEEP_RATIO ** (t / duration))
        elif pattern == "falling":
            freq = fc * half * (SWEEP_RATIO ** (-t / duration))
        else:
            freq = np.full(n, fc)
        signal = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    gate = np.zeros(n)
    ramp = max(1, int(0.01 * sr))  # 10 ms fades avoid clicks that would read as broadband noise
    for a, b in gate_spans:
        i, j = int(a * sr), min(n, int(b * sr))
        seg = np.ones(j - i)
        r = min(ramp, (j - i) // 2)
        if r:
            seg[:r] = np.linspace(0, 1, r)
            seg[-r:] = np.linspace(1, 0, r)
        gate[i:j] = seg
    out = amp * signal * gate + rng.standard_normal(n) * 0.003
    if attrs["channels"] == 2:
        out = np.stack([out, out * rng.uniform(0.7, 1.0)], axis=1)
    return np.clip(out, -1, 1).astype(np.float32)


def encode_audio(data: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """16-bit PCM WAV or FLAC via libsndfile (no timestamps, so reproducible)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format={"wav": "WAV", "flac": "FLAC"}[fmt], subtype="PCM_16")
    return buf.getvalue()


def _resample(data: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    n_out = max(1, int(round(len(data) * sr_to / sr_from)))
    t_out = np.arange(n_out) * (sr_from / sr_to)
    t_in = np.arange(len(data))
    if data.ndim == 1:
        return np.interp(t_out, t_in, data).astype(np.float32)
    return np.stack([np.interp(t_out, t_in, data[:, c]) for c in range(data.shape[1])], axis=1).astype(np.float32)


def _corrupt_bytes(rng: np.random.Generator) -> bytes:
    # 0..254 only: without 0xFF there is no JPEG marker or MPEG/ADTS sync word a lenient decoder could lock onto
    data = rng.integers(0, 255, size=int(rng.integers(2_000, 40_000)), dtype=np.uint8)
    data[:4] = (0x5A, 0x71, 0x13, 0x07)  # a fixed, meaningless lead so no format's magic can appear by chance
    return data.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Plan and build
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    index: int
    modality: str
    defect: str | None
    id: str = ""
    path: str = ""
    caption: str = ""
    dup_of: str | None = None
    expected: str | None = None
    caption_ok: bool = True
    true_caption: str | None = None
    attrs: dict | None = None


def defect_counts(n: int, defect_rate: float) -> dict[str, int]:
    """Rows per defect for one modality with ``n`` clean items (see the module docstring)."""
    if defect_rate <= 0 or n <= 0:
        return dict.fromkeys(DEFECTS, 0)
    budget = n * defect_rate / (1.0 - defect_rate)
    weight_total = 3 * len(CAPTION_DEFECTS) + (len(DEFECTS) - len(CAPTION_DEFECTS))
    counts = {}
    for d in DEFECTS:
        if d in CAPTION_DEFECTS:
            counts[d] = max(3, round(budget * 3 / weight_total), min(15, n // 3))
        else:
            counts[d] = max(3, round(budget / weight_total))
    return counts


def _item_rng(seed: int, modality: str, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, MODALITIES.index(modality), index, salt])


def _plan(modality: str, n: int, defect_rate: float, seed: int) -> list[_Row]:
    rng = np.random.default_rng([seed, MODALITIES.index(modality), 1_000_000_007])
    labels: list[str | None] = [None] * n
    for d, k in defect_counts(n, defect_rate).items():
        labels += [d] * k
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    # a duplicate must come after its original, so "keep the first seen" dedup agrees with dup_of
    for i, d in enumerate(labels):
        if d in DUPLICATE_DEFECTS and None not in labels[:i]:
            j = labels.index(None, i)
            labels[i], labels[j] = None, d
    rows = [_Row(index=i, modality=modality, defect=d) for i, d in enumerate(labels)]
    for row in rows:
        row.id = f"{ID_PREFIX[modality]}-{row.index:05d}"
    return rows


def _write_media(media_dir: Path, row: _Row, data: bytes, ext: str) -> None:
    rel = f"media/{row.modality}/{row.id}.{ext}"
    (media_dir.parent / rel).write_bytes(data)
    (media_dir / row.modality / f"{row.id}.txt").write_text(row.caption, encoding="utf-8")
    row.path = rel


def _render_original(modality: str, attrs: dict, rng: np.random.Generator) -> tuple[bytes, dict]:
    if modality == "image":
        img = render_image(attrs, rng)
        return encode_image(img, attrs["format"], rng), attrs
    if modality == "video":
        frames = render_video_frames(attrs, rng)
        return encode_video(frames, attrs["fps"], attrs["codec"], attrs["format"]), attrs
    samples = render_audio(attrs, rng)
    attrs = {**attrs, "samples": int(samples.shape[0]), "duration": round(samples.shape[0] / attrs["sample_rate"], 4)}
    return encode_audio(samples, attrs["sample_rate"], attrs["format"]), attrs


def _near_duplicate(modality: str, original: bytes, attrs: dict, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A perceptually equal variant of ``original``: resized, recompressed, cropped, re-encoded or resampled."""
    attrs = dict(attrs)
    if modality == "image":
        img = Image.open(io.BytesIO(original))
        img.load()
        if img.mode == "P":
            img = img.convert("RGB")
        op = _pick(rng, ("resize", "recompress", "crop"))
        w, h = img.size
        if op == "resize":
            s = rng.uniform(0.5, 0.85)
            img = img.resize((max(32, round(w * s)), max(32, round(h * s))), Image.Resampling.BILINEAR)
        elif op == "crop":
            dx, dy = round(w * rng.uniform(0.01, 0.03)), round(h * rng.uniform(0.01, 0.03))
            img = img.crop((dx, dy, w - dx, h - dy))
        fmt = "jpg" if op == "recompress" else attrs["format"]
        data = encode_image(img, fmt, rng, quality=int(rng.integers(35, 66)) if op == "recompress" else None)
        mode = Image.open(io.BytesIO(data)).mode  # the encoder may have changed it (P/RGBA to JPEG)
        attrs.update(width=img.size[0], height=img.size[1], mode=mode, format=fmt, near_dup_op=op)
        return data, attrs
    if modality == "video":
        frames = decode_video_frames(original)
        op = _pick(rng, ("rescale", "bitrate"))
        if op == "rescale":
            s = rng.uniform(0.6, 0.8)
            w, h = (max(32, 2 * round(attrs["width"] * s / 2)), max(32, 2 * round(attrs["height"] * s / 2)))
            frames = [np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR)) for f in frames]
            attrs.update(width=w, height=h)
        data = encode_video(
            frames, attrs["fps"], attrs["codec"], attrs["format"], quality="low" if op == "bitrate" else "normal"
        )
        attrs.update(frames=len(frames), near_dup_op=op)
        return data, attrs
    import soundfile as sf

    samples, sr = sf.read(io.BytesIO(original), dtype="float32")
    op = _pick(rng, ("transcode", "resample", "gain"))
    fmt = attrs["format"]
    if op == "transcode":
        fmt = "flac" if fmt == "wav" else "wav"
    elif op == "resample":
        new_sr = _pick(rng, tuple(r for r in (16000, 22050, 44100) if r != sr))
        samples, sr = _resample(samples, sr, new_sr), new_sr
    else:
        samples = samples * rng.uniform(0.5, 0.8)
    attrs.update(format=fmt, sample_rate=sr, samples=int(samples.shape[0]), near_dup_op=op)
    return encode_audio(samples, sr, fmt), attrs


def _build_modality(out_dir: Path, modality: str, n: int, defect_rate: float, seed: int) -> list[_Row]:
    media_dir = out_dir / "media"
    (media_dir / modality).mkdir(parents=True, exist_ok=True)
    captioner = CAPTIONERS[modality]
    rows = _plan(modality, n, defect_rate, seed)
    originals: dict[int, bytes] = {}

    for row in rows:
        if row.defect in DUPLICATE_DEFECTS:
            continue
        rng = _item_rng(seed, modality, row.index)
        attrs = _ATTR_SAMPLERS[modality](rng)
        row.true_caption = captioner(attrs, None)
        row.caption = captioner(attrs, rng)
        ext = attrs["format"]
        if row.defect in URL_DEFECT_ROUTES:
            row.path = f"{URL_DEFECT_ROUTES[row.defect]}/{row.id}.{ext}"
            row.expected = expected_crawl_reason(row.defect, modality)
            row.attrs = attrs
            continue
        if row.defect == "corrupt_file":
            row.expected = expected_crawl_reason(row.defect, modality)
            row.attrs = {"format": ext}
            _write_media(media_dir, row, _corrupt_bytes(rng), ext)
            continue
        data, attrs = _render_original(modality, attrs, rng)
        row.attrs = attrs
        if row.defect == "truncated_file":
            cut = int(len(data) * rng.uniform(0.4, 0.7))
            row.attrs = {**attrs, "full_bytes": len(data)}
            row.expected = expected_crawl_reason(row.defect, modality)
            _write_media(media_dir, row, data[:cut], ext)
            continue
        if row.defect == "mismatched_caption":
            row.caption = captioner(_mismatched_attrs(modality, attrs, rng), rng)
        elif row.defect == "gibberish_caption":
            row.caption = gibberish_caption(rng)
        elif row.defect == "non_english_caption":
            lang = _pick(rng, LANGUAGES)
            row.caption = foreign_caption(modality, attrs, lang)
            row.attrs = {**attrs, "language": lang}
        row.caption_ok = row.defect not in CAPTION_DEFECTS
        _write_media(media_dir, row, data, ext)
        if row.defect is None:
            originals[row.index] = data

    # duplicates copy or transform an earlier clean item; prefer originals not used yet
    by_index = {r.index: r for r in rows}
    used: set[int] = set()
    for row in rows:
        if row.defect not in DUPLICATE_DEFECTS:
            continue
        rng = _item_rng(seed, modality, row.index)
        earlier = [i for i in originals if i < row.index]
        fresh = [i for i in earlier if i not in used] or earlier
        src = by_index[fresh[int(rng.integers(len(fresh)))]]
        used.add(src.index)
        row.dup_of = src.id
        row.true_caption = src.true_caption
        row.caption = src.caption if rng.random() < 0.5 else captioner(src.attrs, rng)
        if row.defect == "exact_duplicate":
            data, attrs = originals[src.index], dict(src.attrs)
        else:
            data, attrs = _near_duplicate(modality, originals[src.index], src.attrs, rng)
        row.attrs = attrs
        _write_media(media_dir, row, data, attrs["format"])
    return rows


def _prepare_out_dir(out_dir: Path) -> None:
    media = out_dir / "media"
    if media.exists():
        if not (out_dir / "sample.json").exists():
            raise FileExistsError(f"{media} exists and is not from a previous sample; refusing to overwrite it")
        shutil.rmtree(media)
    out_dir.mkdir(parents=True, exist_ok=True)


def generate_sample(
    out_dir: str | Path,
    seed: int = 0,
    n_image: int = 240,
    n_video: int = 48,
    n_audio: int = 72,
    defect_rate: float = 0.25,
    progress: bool = False,
) -> dict:
    """Write the sample (media, captions, ``labels.parquet``, ``sample.json``) and return a summary.

    ``n_*`` count clean items; defective rows come on top (see the module docstring). The same seed gives
    byte-identical files.
    """
    if not 0.0 <= defect_rate < 1.0:
        raise ValueError(f"defect_rate must be in [0, 1), got {defect_rate}")
    started = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out)
    all_rows: list[_Row] = []
    for modality, n in zip(MODALITIES, (n_image, n_video, n_audio)):
        t0 = time.perf_counter()
        rows = _build_modality(out, modality, n, defect_rate, seed)
        all_rows += rows
        if progress:
            print(f"sample: {len(rows)} {modality} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    columns: dict[str, list] = {name: [] for name in LABELS_SCHEMA.names}
    for r in all_rows:
        columns["id"].append(r.id)
        columns["modality"].append(r.modality)
        columns["path"].append(r.path)
        columns["caption"].append(r.caption)
        columns["defect"].append(r.defect)
        columns["dup_of"].append(r.dup_of)
        columns["expected_crawl_reason"].append(r.expected)
        columns["clean_caption_ok"].append(r.caption_ok)
        columns["true_caption"].append(r.true_caption)
        columns["attrs"].append(json.dumps(r.attrs, sort_keys=True) if r.attrs is not None else None)
    labels_path = out / "labels.parquet"
    pq.write_table(pa.table(columns, schema=LABELS_SCHEMA), labels_path)

    counts = {m: sum(1 for r in all_rows if r.modality == m) for m in MODALITIES}
    clean = {m: sum(1 for r in all_rows if r.modality == m and r.defect is None) for m in MODALITIES}
    defects = {
        m: {d: sum(1 for r in all_rows if r.modality == m and r.defect == d) for d in DEFECTS} for m in MODALITIES
    }
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "params": {"n_image": n_image, "n_video": n_video, "n_audio": n_audio, "defect_rate": defect_rate},
        "rows": len(all_rows),
        "files": sum(1 for r in all_rows if r.path.startswith("media/")),
        "counts": counts,
        "clean": clean,
        "defects": defects,
    }
    sample_json = out / "sample.json"
    sample_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        **meta,
        "out_dir": out,
        "media_dir": out / "media",
        "labels": labels_path,
        "sample_json": sample_json,
        "seconds": round(time.perf_counter() - started, 3),
    }
