"""The evaluation protocol written next to every score, so that two numbers from two runs are
comparable or visibly not: the feature extractor and its hash, how images were resized, their
size and count, which checkpoint was scored; and the warning when FID cannot mean much.

Why: FID is biased upwards on small sets (it falls as images are added, so 40 test images give a
much larger FID than 2,000 of the same distribution), the resize filter and 8-bit rounding move
it by more than many reported gains, and "best during training" is not "last". KID is unbiased
and comes with a subset-bootstrap interval (translate.eval.metrics.kid_interval).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from translate.eval.fid import small_feature_net

FID_MIN_IMAGES = 2000  # below this FID is biased and unstable (Inception: 2,048 features)
RESIZE = ("8-bit rounding, then torch bilinear antialiased resize, half-pixel centres "
          "(translate.eval.metrics.metric_images)")
KID_INTERVAL = ("95%: 2.5-97.5 percentiles of KID over 100 random subsets of min(1000, n/2) "
                "images per side (translate.eval.metrics.kid_interval)")


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extractor_sha256(spec: str, extractor: torch.nn.Module | None = None) -> str:
    """sha256 of the Inception weights file, or of the small net's parameters (its seed and
    shape decide them): equal hashes, same features."""
    if spec != "small":
        st = Path(spec).stat()
        return _file_sha256(str(Path(spec).resolve()), st.st_size, st.st_mtime_ns)
    net = extractor if extractor is not None else small_feature_net()
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fid_warning(counts: dict[str, int]) -> str | None:
    """A line when a set is too small for FID to be compared across image counts."""
    n = min(counts.values())
    if n >= FID_MIN_IMAGES:
        return None
    sets = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    return (f"FID on few images ({sets}): below {FID_MIN_IMAGES:,} (Inception's features have "
            "2,048 dimensions) it is biased upwards and falls as images are added; compare "
            "FIDs only at equal image counts, or compare KID and its interval")


def describe(checkpoint: str, counts: dict[str, int], features: str | None = None,
             spec: str | None = None, image_size: tuple[int, int] | str = "") -> dict[str, Any]:
    """The protocol of one evaluation, as written into its output: `features` (the label) and
    `spec` ("small" or the weights file) when it has FID/KID, `image_size` (H, W) the images
    were resized to before the extractor."""
    out: dict[str, Any] = {"checkpoint": checkpoint, "images": counts}
    if features is not None and spec is not None:
        size = f"{image_size[1]}x{image_size[0]} px" if isinstance(image_size, tuple) else \
            image_size
        out.update(features=features, features_sha256=extractor_sha256(spec), resize=RESIZE,
                   image_size=size, kid_interval=KID_INTERVAL)
    return out


def lines(protocol: dict[str, Any]) -> list[str]:
    """The protocol as short printable lines."""
    out = [f"checkpoint: {protocol['checkpoint']}; images: "
           + ", ".join(f"{k} {v}" for k, v in protocol["images"].items())]
    if "features" in protocol:
        out.append(f"features: {protocol['features']} (sha256 {protocol['features_sha256'][:16]})"
                   f"; {protocol['image_size']}; {protocol['resize']}")
    if "kid_interval" in protocol:
        out.append(f"KID interval: {protocol['kid_interval']}")
    return out


def checkpoint_of(folder: Path, step: int, chosen: bool) -> str:
    """How a run's checkpoint was picked: the best by a score, the newest, or --step."""
    record = folder / "best.json"
    if record.is_file():
        best = json.loads(record.read_text())
        return f"step {step}, the best by {best['metric']} ({best['value']:.6g})"
    return f"step {step}, " + ("chosen with --step" if chosen else "the newest (last)")
