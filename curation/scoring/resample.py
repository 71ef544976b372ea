"""Pillow's resize (bicubic or bilinear, 8 bits a channel), computed in torch for a batch of images of any sizes:
the same pixels, bit for bit, on a GPU.

On a GPU the image-text model scores images faster than the cores can resize them with PIL (on the sample, PIL's
resize was two thirds of an image's decode time), so the decode tasks can send the decoded pixels at their own
size and the model's actor resizes them here. Pillow's arithmetic is integer and deterministic, and this is it:

* each pass's weights are Pillow's ``precompute_coeffs`` (the filter evaluated in double precision at the same
  points by the same operations, normalised by the same sequential sum) rounded to 22-bit fixed point as
  ``normalize_coeffs_8bpc`` rounds them. They are made on the device for every frame of a chunk at once: made
  frame by frame in numpy they took 140 us an image of the actor's CPU, which paces its GPU;
* each pass sums ``pixel * weight`` from ``2**21`` and keeps ``sum >> 22`` clipped to 0-255. The sums are
  integers below 2**40, which float64 holds exactly, so float64 matrix products give the same sums in any order,
  on any device. Each product covers a block of 32 output pixels and only the input pixels that block reads. A
  dense product, every input pixel times every output pixel, took 6.5 times the arithmetic for the sample's first
  64 images at 224 pixels (30 against 4.6 GFLOP) and, on one CPU core, twice the time (35.6 against 17 ms an
  image);
* float64 is slow on most GPUs (1/32 to 1/64 of float32 by NVIDIA's own figures, on all but its HPC parts), so
  there the weights are split in two, ``k = 256 * hi + lo`` with ``|lo| < 256``, and each half's products are
  integers whose sums float32 holds exactly (below 2**24) in any order: for ``lo`` at most ``255 * 255 * 257``;
  for ``hi`` 255 times the absolute sum of a pixel's weights over 2**8, which is at most 1.27 * 2**14 (the largest
  over 15,857 pairs of sizes from 1 to 4,000 pixels: a third of the limit). That needs IEEE float32 products
  (not TF32) and blocks that read at most 257 input pixels (shrinks by up to about 7); otherwise the products
  are float64. So are they on CPUs (on one core two float32 products took 20.8 against 17.5 ms an image of the
  sample) and on NVIDIA's HPC parts, whose float64 runs at half float32's rate (on an H100 the halves were no
  faster, see :func:`_float32_exact`);
* the passes run in Pillow's order: horizontal first, except (since Pillow 13) when the height shrinks by more
  than twice as many pixels as the width. The intermediate image is rounded to 8 bits between them, so the order
  matters (a new rule in a later Pillow would fail the test that compares them).

A test (tests/stages/test_score.py) compares this with PIL's resize for random sizes in both pass orders, both
filters and every open_clip resize mode, and for the frames of the generated sample's first 60 clean images and
clips at two model sizes. Only the output rows and columns that the centre crop keeps are computed: each output
pixel depends on its own weights alone, so cropping the weights is exact."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import PIL

from curation.scoring.decode import crop_offset, device_bytes, frame_runs, to_device

PRECISION_BITS = 22  # Pillow: 32 - 8 bits of result - 2 bits of headroom
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)
MAX_CHUNK_PIXELS = 1 << 24  # source pixels (padded) resized in one go on CPUs, and at least on GPUs
CHUNK_BYTES_PER_PIXEL = 64  # a chunk's peak memory a padded source pixel: 34 to 57 measured (CPU, sizes 256 to 2048)
CHUNK_GPU_SHARE = 16  # on a GPU a chunk may take up to 1/16 of its memory (two CLIP actors share one by default)
BLOCK = 32  # output pixels a matrix product computes: each reads about ``BLOCK * scale + taps`` input pixels
FLOAT32_MAX_SPAN = 257  # input pixels a block may read for float32 products: 255 * 255 * 257 < 2**24
FLOAT32_DEVICES = ("cuda",)  # device types whose products run as two float32 ones (but see FAST_FLOAT64_GPUS)
# CUDA compute capabilities with float64 at half float32's rate (P100, V100, A100, H100/H200, B200): float64 there
FAST_FLOAT64_GPUS = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x):
    """Pillow's ``bicubic_filter`` (a = -0.5), in its order of operations, on a float64 tensor."""
    import torch

    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


def _bilinear(x):
    import torch

    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, 0.0)


def horizontal_first(src: tuple[int, int], new: tuple[int, int]) -> bool:
    """Whether Pillow resizes the width before the height for ``src`` -> ``new`` (both (h, w))."""
    if _PILLOW_MAJOR < 13:
        return True
    shrink_h, shrink_w = src[0] - new[0], src[1] - new[1]
    return not (shrink_h > 0 and shrink_h > shrink_w * 2)


def axis_weights(src, new, offset, target: int, bilinear: bool, device: Any = "cpu", block: int = BLOCK):
    """Pillow's fixed-point weights for one axis of ``n`` frames: frame ``i``'s axis resized from ``src[i]`` to
    ``new[i]`` pixels, of which output pixel ``p`` is resized pixel ``p + offset[i]`` (the centre crop or pad).
    ``src``, ``new`` and ``offset`` are sequences of ints (n,); the weights are made on ``device``.

    Each output pixel reads a few input pixels (its taps), and consecutive output pixels read overlapping runs of
    them, so the weights come in blocks of ``block`` output pixels: ``bands`` (n, blocks, block, span) float64,
    the weights of block ``b``'s pixels over input pixels ``starts[:, b]`` to ``starts[:, b] + span`` (zero past a
    frame's last pixel), so that a pass multiplies only the input pixels a block reads. Also returns ``starts``
    (n, blocks) and which output pixels lie inside the resized image (n, target): those of a pad get no weights and
    come out 0. The tensors' sizes are worked out on the host (:func:`_extent`): no step waits for the device."""
    import torch

    dev = device
    n = len(src)
    fn, support = (_bilinear, 1.0) if bilinear else (_bicubic, 2.0)
    ksize, span = _extent(src, new, support, block)
    src, new, offset = (to_device(v, dev) for v in (src, new, offset))
    blocks = -(-target // block)
    j = torch.arange(blocks * block, device=dev)[None] + offset[:, None]  # whole blocks: those past target get 0
    inside = (j >= 0) & (j < new[:, None])
    inside[:, target:] = False
    j = torch.minimum(j.clamp_min(0), new[:, None] - 1).double()
    scale = (src.double() / new.double())[:, None]  # Pillow divides the (float32) box width: exact for real widths
    filterscale = scale.clamp_min(1.0)
    support = support * filterscale
    center = (j + 0.5) * scale
    first = torch.trunc(center - support + 0.5).clamp_min(0.0)
    count = torch.minimum(torch.trunc(center + support + 0.5), src.double()[:, None]) - first
    taps = torch.arange(ksize, device=dev, dtype=torch.float64)
    w = fn((taps + first[..., None] - center[..., None] + 0.5) * (1.0 / filterscale)[..., None])
    w = torch.where(taps < count[..., None], w, 0.0)
    total = torch.zeros_like(center)
    for t in range(ksize):  # Pillow sums tap by tap; a tensor sum would pair them up and round differently
        total = total + w[..., t]
    w = torch.where(total[..., None] != 0.0, w / torch.where(total == 0.0, 1.0, total)[..., None], w)
    k = torch.where(w < 0, torch.trunc(-0.5 + w * _ONE), torch.trunc(0.5 + w * _ONE))
    k = torch.where(inside[..., None], k, 0.0).view(n, blocks, block, ksize)
    first = first.long().view(n, blocks, block)
    starts = first[..., 0]  # ``first`` grows with the output pixel, and so does ``first + count``
    cols = (first - starts[..., None])[..., None] + taps.long()  # past a pixel's last tap the weight is 0
    bands = torch.zeros((n, blocks, block, span), dtype=torch.float64, device=dev)
    bands.scatter_add_(3, cols.clamp_max(span - 1), k)
    return bands, starts, inside[:, :target]


def _extent(src, new, support: float, block: int) -> tuple[int, int]:
    """(taps, span) of :func:`axis_weights` for frames resized from ``src`` to ``new`` pixels, on the host: the
    widest frame's taps (Pillow's ``ksize``; the others' extra taps get no weight), and a bound on the input pixels
    a block of ``block`` output pixels reads. Block pixel ``j`` reads input pixels ``trunc(c_j - s + 0.5)`` up to
    ``trunc(c_j + s + 0.5)`` (exclusive, clipped to the frame), ``c_j = (j + 0.5) * scale`` and ``s`` the
    filter's support times ``max(scale, 1)``; across a block that is fewer than ``(block - 1) * scale + 2 * s + 1``
    pixels, since ``trunc(a) - trunc(b) < a - b + 1``. One more covers the float arithmetic's rounding. A wider
    band only adds input pixels of weight 0."""
    ksize = span = 1
    for s_, n_ in zip(src, new):
        scale = s_ / n_  # as the device computes it: float64 division
        reach = support * max(scale, 1.0)
        ksize = max(ksize, int(math.ceil(reach)) * 2 + 1)
        span = max(span, min(s_, int(math.floor((block - 1) * scale + 2 * reach + 1)) + 1))
    return ksize, span


def _first_pass(flat, frames, bands, starts, along_width: bool):
    """The first pass, read straight from the uint8 buffer that holds the frames (``frames``: (offset, h, w)),
    along each frame's rows (``along_width``) or its columns, with :func:`axis_weights`' ``bands`` and ``starts``:
    the fixed-point sums (n, blocks * block * 3, other) float64, ``other`` the axis not resized, last. That axis
    is padded to the chunk's largest by repeating the frame's last row or column, which the second pass gives no
    weight. Each block of output pixels is one matrix product of the input pixels it reads."""
    import torch

    dev = flat.device
    n, blocks, block, span = bands.shape
    base, hs, ws = (to_device(v, dev)[:, None] for v in zip(*frames))
    other = torch.arange(max(f[1] if along_width else f[2] for f in frames), device=dev)
    reads = (starts[..., None] + torch.arange(span, device=dev)).view(n, -1)  # the input pixels each block reads
    if along_width:  # byte offsets: of each read pixel, and of each channel of the other axis' pixels
        read = torch.minimum(reads, ws - 1) * 3
        other = base + torch.minimum(other, hs - 1) * ws * 3
    else:
        read = torch.minimum(reads, hs - 1) * ws * 3
        other = base + torch.minimum(other, ws - 1) * 3
    other = (other[:, None, :] + torch.arange(3, device=dev)[None, :, None]).view(n, 1, -1)
    runs = flat[read[:, :, None] + other].view(n, blocks, span, -1)  # (n, blocks, span, 3 * other)
    return _products(bands, runs, left=True).view(n, blocks * block * 3, -1)


def _second_pass(x, bands, starts):
    """The second pass along the last axis of ``x`` (n, rows, width), uint8: the sums (n, blocks, rows, block),
    float64."""
    import torch

    n, rows, width = x.shape
    _, blocks, block, span = bands.shape
    idx = (starts[..., None] + torch.arange(span, device=x.device)).clamp_max(width - 1)  # (n, blocks, span)
    runs = x[:, None].expand(n, blocks, rows, width).gather(3, idx[:, :, None].expand(n, blocks, rows, span))
    return _products(bands, runs, left=False)


def _products(bands, runs, left: bool):
    """``bands @ runs`` (``left``) or ``runs @ bands.mT``, blockwise: the exact fixed-point sums, float64. In two
    float32 products, one a half of the weights, where that is exact (see the module's notes), else in float64."""
    import torch

    if not _float32_exact(bands):
        runs = runs.double()
        return bands @ runs if left else runs @ bands.mT
    hi = torch.trunc(bands / 256.0)
    runs = runs.float()
    sums = None
    for scale, part in ((256.0, hi), (1.0, bands - hi * 256.0)):
        part = part.float()
        out = (part @ runs if left else runs @ part.mT).double()
        sums = out.mul_(scale) if sums is None else sums.add_(out)
    return sums


def _float32_exact(bands) -> bool:
    """Whether :func:`_products` runs as two float32 products: on :data:`FLOAT32_DEVICES` other than the GPUs of
    :data:`FAST_FLOAT64_GPUS`, blocks reading at most :data:`FLOAT32_MAX_SPAN` input pixels, and the device's
    float32 products at IEEE precision (``none``, the default, or ``ieee``; not ``tf32`` or ``bf16``, which round
    the inputs). The backend's own setting is read: ``torch.get_float32_matmul_precision()`` raises where a process
    set it through both of torch's APIs.

    On an H100 the halves gained nothing: the benchmark's images resized at 7,071 against 7,707 records/s in
    float64, and its clips, in batches of 32, at 116 against 2,861 (not explained yet; batches of 256 clips ran at
    4,917 with the halves)."""
    import torch

    device = bands.device.type
    if device not in FLOAT32_DEVICES or bands.shape[-1] > FLOAT32_MAX_SPAN:
        return False
    if device == "cuda" and torch.cuda.get_device_capability(bands.device) in FAST_FLOAT64_GPUS:
        return False
    backend = torch.backends.cuda.matmul if device == "cuda" else torch.backends.mkldnn.matmul
    return backend.fp32_precision in ("none", "ieee")


@lru_cache(maxsize=1)
def matches_pil() -> bool:
    """Whether this module gives the installed Pillow's pixels, checked on small random images in both pass orders
    and both filters (7 ms on one core once torch is imported). The score stage leaves resizes to the actors only
    where it does: a later Pillow could change its arithmetic or its pass order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    cases = [((40, 30), (9, 25)), ((30, 40), (25, 9)), ((17, 23), (41, 37)), ((64, 12), (20, 11))]
    for bilinear in (False, True):
        resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
        for src, new in cases:
            a = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
            want = np.asarray(Image.fromarray(a).resize((new[1], new[0]), resample))
            got = resize_batch([a], lambda h, w, new=new, b=bilinear: (new, b, 0), new)[0].numpy()
            if not np.array_equal(want, got):
                return False
    return True


def resize_batch(arrays: list[np.ndarray], geometry, target: tuple[int, int], device: Any = "cpu"):
    """Images (H, W, 3) and videos (F, H, W, 3), uint8, resized and cropped to ``target`` (h, w) as the model's
    preprocessing would with PIL: a uint8 tensor (frames, h, w, 3) on ``device``, in order.

    ``geometry(h, w)`` gives an image's resized size, whether its filter is bilinear, and its pad fill (as
    :meth:`curation.scoring.decode.ImagePreprocessor.geometry`). Frames already at ``target`` are copied as they
    are (that is what the model's preprocessing does to them)."""
    import torch

    flat = device_bytes(frame_runs([a.reshape(-1, 1) for a in arrays]), device)  # back-to-back rows: one part
    frames: list[tuple[int, int, int]] = []  # (byte offset in the device buffer, h, w) of every frame
    at = 0
    for a in arrays:
        f = a[None] if a.ndim == 3 else a
        size = f.shape[1] * f.shape[2] * 3
        frames.extend((at + i * size, f.shape[1], f.shape[2]) for i in range(f.shape[0]))
        at += f.shape[0] * size
    out = torch.empty((len(frames), target[0], target[1], 3), dtype=torch.uint8, device=device)
    groups: dict[Any, list[int]] = {}  # frames resized alike: Pillow's pass order, the filter, the pad's fill
    news: dict[int, tuple[int, int]] = {}
    for i, (_, h, w) in enumerate(frames):
        if (h, w) == target:
            groups.setdefault("as is", []).append(i)
            continue
        news[i], bilinear, fill = geometry(h, w)
        groups.setdefault((horizontal_first((h, w), news[i]), bilinear, fill), []).append(i)
    most = chunk_pixels(out.device)
    for key, idx in groups.items():
        if key == "as is":  # consecutive frames lie back to back in ``flat``: one copy a run of them
            size = target[0] * target[1] * 3
            for first, last in _runs(idx):
                block = flat[frames[first][0] : frames[last][0] + size]
                out[first : last + 1] = block.view(last + 1 - first, target[0], target[1], 3)
            continue
        idx.sort(key=lambda i: frames[i][1] * frames[i][2])  # similar sizes together: less padding
        for chunk in _chunks(idx, frames, most):
            _resize_chunk(flat, [frames[i] for i in chunk], [news[i] for i in chunk], out, chunk, target, key)
    return out


def _runs(idx: list[int]):
    """``(first, last)`` of each run of consecutive numbers in ``idx`` (increasing)."""
    start = prev = idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            yield start, prev
            start = i
        prev = i
    yield start, prev


def chunk_pixels(device) -> int:
    """Padded source pixels :func:`resize_batch` resizes in one go on ``device``: :data:`MAX_CHUNK_PIXELS`, or on a
    GPU the largest power of two whose chunk takes at most 1/:data:`CHUNK_GPU_SHARE` of its memory, if more. Each
    chunk runs the same few hundred small kernels, whose launches the actor's one core pays: on an H100 the
    benchmark's images resized at 10,131 images/s in chunks of 2**26 pixels against 8,389 in chunks of 2**24."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return MAX_CHUNK_PIXELS
    total = torch.cuda.get_device_properties(device).total_memory
    fits = total // (CHUNK_GPU_SHARE * CHUNK_BYTES_PER_PIXEL)
    return max(MAX_CHUNK_PIXELS, 1 << (fits.bit_length() - 1))


def _chunks(idx: list[int], frames: list[tuple[int, int, int]], most: int = MAX_CHUNK_PIXELS):
    """``idx`` in runs whose padded size (frames x tallest x widest) stays within ``most`` pixels (a frame larger
    than that on its own is a run of its own)."""
    chunk: list[int] = []
    hm = wm = 0
    for i in idx:
        h, w = frames[i][1], frames[i][2]
        if chunk and (len(chunk) + 1) * max(hm, h) * max(wm, w) > most:
            yield chunk
            chunk, hm, wm = [], 0, 0
        chunk.append(i)
        hm, wm = max(hm, h), max(wm, w)
    if chunk:
        yield chunk


def _round(sums):
    """Pillow's ``clip8``: the fixed-point sums (started at half a unit) shifted down and clipped to 0-255."""
    return sums.add_(_HALF).div_(_ONE).floor_().clamp_(0, 255)


def _resize_chunk(flat, frames, news, out, where: list[int], target, key) -> None:
    """Resize a chunk of frames alike (``key``: Pillow's pass order, the filter, the pad's fill) into ``out``."""
    import torch

    h_first, bilinear, fill = key
    dev = flat.device

    # both axes' weights in one go (rows, then columns, as 2n frames): half the small kernels a GPU runs for them
    n, size = len(frames), max(target)
    src = [f[1] for f in frames] + [f[2] for f in frames]
    new = [v[0] for v in news] + [v[1] for v in news]
    offsets = [crop_offset(v, t) for v, t in zip(new, [target[0]] * n + [target[1]] * n)]
    bands, starts, inside = axis_weights(src, new, offsets, size, bilinear, dev)
    (wy, wx), (ys, xs) = bands.split(n), starts.split(n)
    rows, cols = inside[:n, : target[0]], inside[n:, : target[1]]
    (w1, s1), (w2, s2) = ((wx, xs), (wy, ys)) if h_first else ((wy, ys), (wx, xs))
    y = _round(_first_pass(flat, frames, w1, s1, along_width=h_first)).to(torch.uint8)  # 8 bits, as in Pillow
    y = _round(_second_pass(y, w2, s2)).to(torch.uint8)
    blocks, block = y.shape[1], y.shape[3]  # (n, second pass blocks, first pass output pixels x 3, block)
    y = y.view(n, blocks, -1, 3, block)
    if h_first:  # the second pass gave the rows
        y = y.permute(0, 1, 4, 2, 3).reshape(n, blocks * block, -1, 3)
    else:
        y = y.permute(0, 2, 1, 4, 3).reshape(n, -1, blocks * block, 3)
    y = y[:, : target[0], : target[1]]
    if fill:  # the pad's pixels: outside the resized image's rows or columns
        y = torch.where((rows[:, :, None] & cols[:, None, :])[..., None], y, fill)
    out[to_device(where, dev)] = y
