"""Per-subject intensity standardization: scale a T1w volume so its white-matter peak is 1.

T1w intensities are in arbitrary scanner units; a learned model should not have to discover each
scanner's gain. White matter is the largest, brightest tissue of a T1w brain, so the mode of the
upper half of the brain's histogram is a robust reference (as in WhiteStripe, Shinohara 2014).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def white_matter_peak(volume: np.ndarray, mask: np.ndarray | None = None, bins: int = 200) -> float:
    """Intensity of the white-matter mode of a skull-stripped T1w volume (> 0)."""
    values = np.asarray(volume, dtype=np.float32)
    values = values[mask] if mask is not None else values.ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 100:
        raise ValueError(f"only {values.size} positive voxels in the brain mask; cannot find the "
                         "white-matter peak (is the volume empty or the mask wrong?)")
    lo, hi = np.percentile(values, [50.0, 99.5])
    if not hi > lo:
        return float(hi)
    counts, edges = np.histogram(values[(values >= lo) & (values <= hi)], bins=bins, range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(float), sigma=bins / 50)
    k = int(np.argmax(smooth))
    return float(0.5 * (edges[k] + edges[k + 1]))
