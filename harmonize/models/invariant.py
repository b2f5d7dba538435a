"""The site-invariant representation model (Moyer et al., NeurIPS 2018; MRM 2020), for 3-D T1w volumes.

A conditional VAE, fully convolutional so that one pass over a chunk encodes every voxel:
  encoder q(z|x): three 3x3x3 valid convolutions -> (mu, log-variance) of a d-dim z per voxel;
      each voxel's z sees a 7^3 neighbourhood (receptive radius 3) of intensity-standardized input.
  decoder p(x|z, site, position): a per-voxel MLP of z, a one-hot site code and smooth features of
      the voxel's template coordinates (so site-specific bias fields can be modelled).
Loss (the corrected form of the paper), per voxel, averaged:
  (1 + lam) * recon + beta * KL(q(z|x) || N(0, I)) + lam * mean_ij KL(q(z|x_i) || q(z|x_j)),
with the pairwise term over voxels sampled across a batch that mixes all sites.
Harmonize: encode, decode at the reference site. Residual decoding (x + dec(z, ref) - dec(z, src))
keeps detail the bottleneck loses; direct decoding (dec(z, ref)) also removes noise.

The estimator works on in-memory arrays (an xarray Dataset with `images`, `mask`, `site`); the graph
layer (harmonize.apply) maps :meth:`InvariantHarmonizer.harmonize_block` over chunks with a halo of
:attr:`InvariantHarmonizer.halo` voxels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from safetensors.torch import load_file, save_file
from torch import nn

from harmonize.io import schema as S
from harmonize.models.base import HarmonizerBase
from harmonize.models.intensity import white_matter_peak
from harmonize.models.penalty import gaussian_kl_to_prior, information_penalty, site_variance_fraction
from harmonize.models.voxel_combat import VoxelComBat, covariate_frame

MODEL_KIND = "invariant"
_DCT_ORDER = 3  # per axis: 3^3 - 1 = 26 basis functions
RECEPTIVE_RADIUS = 3  # three 3x3x3 valid convolutions
CALIBRATION_DIR = "calibration"
CALIBRATION_COVARIATES = (S.AGE, S.SEX)  # biological covariates whose effects the calibration keeps
AGE_MATCH_YEARS = 5.0  # bandwidth of the age matching of subjects compared across sites


def select_device(preference: str = "auto") -> torch.device:
    """'auto' takes the GPU this process was given (a Dask GPU worker sees its own as cuda:0), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def coordinate_features(location: tuple[slice, slice, slice], grid_shape: tuple[int, int, int],
                        ) -> np.ndarray:
    """Smooth functions of template position, (n_features, *block) float32, for a block of the grid.

    The low-frequency 3-D DCT basis (products of cos(pi k (i + 1/2) / n), k < `_DCT_ORDER` per axis,
    the constant left out), as SPM models MR bias fields: a receive-coil bias is smooth and spans
    the head, so a few of these describe it, and products let it vary along oblique directions.
    """
    axes = []
    for sl, n in zip(location, grid_shape, strict=True):
        idx = np.arange(sl.start, sl.stop, dtype=np.float32)
        axes.append(np.stack([np.cos(np.pi * k * (idx + 0.5) / n) for k in range(_DCT_ORDER)]))
    feats = np.einsum("ai,bj,ck->abcijk", *axes).reshape(_DCT_ORDER**3, *(len(a[0]) for a in axes))
    return np.ascontiguousarray(feats[1:], dtype=np.float32)


N_COORD_FEATURES = _DCT_ORDER**3 - 1


class PatchCVAE(nn.Module):
    """Conditional VAE over voxels: a convolutional trunk sees each voxel's 7^3 neighbourhood; the
    posterior head and the decoder are per-voxel MLPs that also see the site and the position.

    The encoder is conditioned on the site too (as in Sohn et al.'s CVAE): knowing the scanner, it
    can map that scanner's contrast back to anatomy, which is what an invariant z must hold.
    """

    def __init__(self, n_sites: int, latent_dim: int = 8, channels: int = 16, hidden: int = 64):
        super().__init__()
        self.n_sites, self.latent_dim = n_sites, latent_dim
        self.trunk = nn.Sequential(
            nn.Conv3d(1, channels, 3), nn.GELU(),
            nn.Conv3d(channels, channels, 3), nn.GELU(),
            nn.Conv3d(channels, channels, 3), nn.GELU(),
        )
        # per-voxel MLPs as Linear layers on channels-last voxels: far faster than 1x1x1 convolutions
        self.head = nn.Sequential(
            nn.Linear(channels + n_sites + N_COORD_FEATURES, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + n_sites + N_COORD_FEATURES, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        # each site's receive-coil bias: a multiplicative field, log-linear in the DCT basis
        self.log_bias = nn.Parameter(torch.zeros(n_sites, N_COORD_FEATURES))

    def posterior(self, features: torch.Tensor, site_onehot: torch.Tensor, coords: torch.Tensor,
                  logvar_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, channels), site_onehot (N or 1, n_sites), coords (N, n_coord) -> mu, logvar (N, d)."""
        site = site_onehot.to(features.dtype).expand(features.shape[0], -1)
        mu, logvar = self.head(torch.cat([features, site, coords.to(features.dtype)], dim=1)).chunk(2, dim=1)
        # clamped: 1/sigma^2 in the pairwise KL overflows otherwise
        return mu, logvar.clamp(*logvar_range)

    def decode_voxels(self, z: torch.Tensor, site_onehot: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """z (N, d), site_onehot (N or 1, n_sites), coords (N, n_coord) -> intensity (N,)."""
        site = site_onehot.to(z.dtype).expand(z.shape[0], -1)
        coords = coords.to(z.dtype)
        log_bias = ((site @ self.log_bias.to(z.dtype)) * coords).sum(dim=1)
        return self.decoder(torch.cat([z, site, coords], dim=1))[:, 0] * log_bias.exp()


def to_device(arrays: tuple, device: torch.device) -> tuple:
    """A batch's numpy arrays as tensors on `device`; pinned host memory (see :class:`BatchPrefetcher`) is
    copied asynchronously, so the copy overlaps with the GPU's work."""
    return tuple(None if a is None else torch.as_tensor(a).to(device, non_blocking=True) for a in arrays)


class BatchPrefetcher:
    """Builds the next training batches in a background thread while the current step runs.

    One producer calls `make` in order, so the batches (and the random draws behind them) are exactly those
    of building them inline: training is the same, step for step, with any `depth`. depth 0 builds inline.
    At most `depth` batches wait in the queue, plus the one being built.
    With `pin` (a CUDA device) the arrays are put in page-locked memory, which a host-to-GPU copy needs to be
    asynchronous. numpy's copies and torch's kernels release the GIL, so the two threads overlap.
    """

    def __init__(self, make: Callable[[], tuple], depth: int = 2, pin: bool = False):
        self._make, self._pin, self._depth = make, pin, int(depth)
        self._error: BaseException | None = None
        if self._depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="harmonize-batches", daemon=True)
            self._thread.start()

    def _build(self) -> tuple:
        arrays = self._make()
        if self._pin:
            arrays = tuple(None if a is None else torch.from_numpy(a).pin_memory() for a in arrays)
        return arrays

    def _put(self, item) -> None:
        """Queue `item`, waiting for room, unless the consumer closed the loader meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(self._build())
        except BaseException as error:  # handed to the consumer, which raises it
            self._error = error
            self._put(None)

    def next(self) -> tuple:
        if self._depth <= 0:
            return self._build()
        if self._stop.is_set():
            raise RuntimeError("the batch loader is closed")
        # after an error only its one sentinel (None) is queued: once consumed, do not wait for another
        item = None if self._error is not None and self._queue.empty() else self._queue.get()
        if item is None:
            raise RuntimeError("building a training batch failed") from self._error
        return item

    def close(self) -> None:
        if self._depth > 0:
            self._stop.set()
            self._thread.join()


def _covariate_matrix(ages: np.ndarray, sexes: np.ndarray) -> np.ndarray:
    """(n, c) float32 biological covariates for the site term: age (missing -> the mean) and one
    indicator per sex level beyond the first; columns without variation are left out."""
    columns = []
    if np.isfinite(ages).sum() > 1:
        columns.append(np.where(np.isfinite(ages), ages, np.nanmean(ages)))
    levels = sorted(set(sexes.tolist()) - {""})
    columns += [(sexes == level).astype(float) for level in levels[1:]]
    columns = [c for c in columns if np.ptp(c) > 0]
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(ages), 0), np.float32)


@dataclass
class TrainingHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    recon: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    site: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stopped_at: int = 0
    best_step: int = 0
    seconds: float = 0.0


class InvariantHarmonizer(HarmonizerBase):
    """Site-invariant conditional VAE harmonizer with the scikit-learn estimator face.

    Parameters are plain values (saved in the model's JSON config); learned state ends in `_`.
    """

    kind = MODEL_KIND
    halo = RECEPTIVE_RADIUS

    def __init__(self, latent_dim: int = 8, channels: int = 16, hidden: int = 64, lam: float = 1.0,
                 beta: float = 1.0, site_weight: float = 1000.0, recon_sigma: float = 0.05, crop: int = 16,
                 groups: int = 1, subjects_per_site: int = 5, pairs: int = 512,
                 steps: int = 800, lr: float = 2e-3, decode: str = "residual",
                 reference_site: str | None = None, max_subjects_per_site: int = 16,
                 val_fraction: float = 0.2, eval_every: int = 50, patience: int = 6, seed: int = 0,
                 device: str = "auto", amp: bool = True, logvar_min: float = -8.0, logvar_max: float = 4.0,
                 torch_threads: int | None = None, calibrate: str = "combat", prefetch: int = 2):
        self.latent_dim = latent_dim
        self.channels = channels
        self.hidden = hidden
        self.lam = lam
        self.beta = beta
        self.site_weight = site_weight
        self.recon_sigma = recon_sigma
        self.crop = crop
        self.groups = groups
        self.subjects_per_site = subjects_per_site
        self.pairs = pairs
        self.steps = steps
        self.lr = lr
        self.decode = decode
        self.reference_site = reference_site
        self.max_subjects_per_site = max_subjects_per_site
        self.val_fraction = val_fraction
        self.eval_every = eval_every
        self.patience = patience
        self.seed = seed
        self.device = device
        self.amp = amp
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max
        self.torch_threads = torch_threads
        self.calibrate = calibrate
        self.prefetch = prefetch

    @property
    def _logvar_range(self) -> tuple[float, float]:
        return (self.logvar_min, self.logvar_max)

    def _check_params(self) -> None:
        if self.decode not in ("residual", "direct"):
            raise ValueError(f"decode must be 'residual' or 'direct', got {self.decode!r}")
        if self.crop <= 2 * RECEPTIVE_RADIUS:
            raise ValueError(f"crop must exceed {2 * RECEPTIVE_RADIUS} voxels, got {self.crop}")
        if min(self.lam, self.beta, self.site_weight) < 0:
            raise ValueError("lam, beta and site_weight must be >= 0")
        if self.subjects_per_site < 1 or self.groups < 1:
            raise ValueError("groups and subjects_per_site must be >= 1")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (batches built ahead; 0 builds them inline), got {self.prefetch}")
        if self.calibrate not in ("combat", "none"):
            raise ValueError(f"calibrate must be 'combat' or 'none', got {self.calibrate!r}")

    # ---- fitting ------------------------------------------------------------------------------
    def fit(self, dataset: xr.Dataset, progress: Callable[[dict], None] | None = None) -> InvariantHarmonizer:
        """Train on a cohort: `images` (subject, x, y, z), `mask` (x, y, z), coordinate `site`.

        Uses at most `max_subjects_per_site` subjects per site (site-balanced); a fraction of subjects
        (never patches of a training subject) is held out for early stopping.
        """
        self._check_params()
        t0 = time.perf_counter()
        sites = np.asarray(dataset[S.SITE].values).astype(str)
        site_names = sorted(set(sites.tolist()))
        if len(site_names) < 2:
            raise ValueError(f"need subjects from at least 2 sites to learn site effects; got {site_names}")
        reference = self.reference_site or site_names[0]
        if reference not in site_names:
            raise ValueError(f"reference site {reference!r} is not among the training sites {site_names}")
        rng = np.random.default_rng(self.seed)
        chosen = []
        for name in site_names:
            idx = np.flatnonzero(sites == name)
            chosen += sorted(rng.permutation(idx)[: self.max_subjects_per_site].tolist())
        mask = np.asarray(dataset[S.MASK].values).astype(bool)
        grid_shape = tuple(int(n) for n in mask.shape)
        volumes, scales, site_idx = [], [], []
        for i in chosen:
            vol = np.asarray(dataset[S.IMAGES].isel({S.SUBJECT: i}).values, dtype=np.float32)
            scale = white_matter_peak(vol, mask)
            volumes.append(vol / scale)
            scales.append(scale)
            site_idx.append(site_names.index(sites[i]))
        site_idx = np.asarray(site_idx)
        ages = np.asarray(dataset[S.AGE].values, dtype=float)[chosen] if S.AGE in dataset.coords else \
            np.full(len(chosen), np.nan)
        sexes = np.asarray(dataset[S.SEX].values).astype(str)[chosen] if S.SEX in dataset.coords else \
            np.full(len(chosen), "")
        val = np.zeros(len(chosen), dtype=bool)
        for s in range(len(site_names)):  # hold out whole subjects, at least one per site when possible
            members = np.flatnonzero(site_idx == s)
            k = int(round(self.val_fraction * len(members)))
            if len(members) >= 3 and k >= 1:
                val[rng.choice(members, size=k, replace=False)] = True
        self.sites_ = site_names
        self.reference_site_ = reference
        self.reference_scale_ = float(np.mean([sc for sc, s in zip(scales, site_idx, strict=True)
                                               if site_names[s] == reference]))
        self.grid_shape_ = grid_shape
        self.train_subjects_ = [str(v) for v in np.asarray(dataset[S.SUBJECT].values)[chosen][~val]]
        self.val_subjects_ = [str(v) for v in np.asarray(dataset[S.SUBJECT].values)[chosen][val]]
        device = select_device(self.device)
        threads = self.torch_threads
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            self._train(volumes, site_idx, ages, sexes, val, mask, device, rng, progress)
        finally:
            torch.set_num_threads(old_threads)
        self.calibration_ = None
        if self.calibrate == "combat":
            self.calibration_ = self._fit_calibration(dataset, chosen, mask)
        self.checksum_ = self._checksum()
        self.history_.seconds = time.perf_counter() - t0
        return self

    def _fit_calibration(self, dataset: xr.Dataset, chosen: list[int], mask: np.ndarray) -> VoxelComBat:
        """Voxel-wise ComBat (to the reference site, age and sex kept) on the network's own outputs for its
        training subjects. A patch model at one site code cannot see what differs between scanners voxel
        by voxel across the whole head (partial-volume contrast at each location, residual bias); ComBat
        estimates exactly that, and on the network's output, where the non-linear, spatially smooth
        scanner effects are already gone, its location/scale model fits (cf. DeepComBat, Hu et al. 2023)."""
        subset = dataset.isel({S.SUBJECT: list(chosen)})
        base = np.stack([self._harmonize_uncalibrated(np.asarray(subset[S.IMAGES].isel({S.SUBJECT: k}).values,
                                                                 dtype=np.float32), str(site), mask)
                         for k, site in enumerate(np.asarray(subset[S.SITE].values).astype(str))])
        names = [c for c in CALIBRATION_COVARIATES if c in subset.coords]
        outputs = xr.Dataset({S.IMAGES: (S.VOLUME_DIMS, base), S.MASK: (S.SPATIAL_DIMS, mask.astype(np.uint8))},
                             coords={S.SITE: (S.SUBJECT, np.asarray(subset[S.SITE].values).astype(str)),
                                     **{c: (S.SUBJECT, np.asarray(subset[c].values)) for c in names}})
        categorical = [c for c in names if c == S.SEX]
        return VoxelComBat(covariates=tuple(names), categorical=tuple(categorical),
                           reference_site=self.reference_site_).fit(outputs)

    def _new_module(self) -> PatchCVAE:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            return PatchCVAE(len(self.sites_), self.latent_dim, self.channels, self.hidden)

    def _train(self, volumes, site_idx, ages, sexes, val, mask, device, rng, progress) -> None:
        crop, r = self.crop, RECEPTIVE_RADIUS
        pad = crop // 2
        padded = np.stack([np.pad(v, pad) for v in volumes])
        padded_mask = np.pad(mask, pad)
        coords_full = coordinate_features(tuple(slice(-pad, n + pad) for n in mask.shape), mask.shape)
        centres = np.argwhere(mask) + pad
        n_sites = len(self.sites_)
        k = self.subjects_per_site
        site_of_member = torch.arange(n_sites, device=device).repeat_interleave(k)  # (B,) for every group

        known_age = np.isfinite(ages)
        covariates = _covariate_matrix(ages, sexes)

        def members(pool: list[np.ndarray], local_rng: np.random.Generator) -> np.ndarray:
            """k subjects of every site, age-matched across sites: sites in real studies differ in age,
            and a site term comparing a young site with an old one would take ageing for scanner."""
            target = local_rng.choice(ages[known_age]) if known_age.any() else np.nan
            chosen = []
            for m in pool:
                weight = np.ones(len(m))
                if np.isfinite(target):
                    gap = np.where(known_age[m], ages[m] - target, 0.0)
                    weight = np.exp(-0.5 * (gap / AGE_MATCH_YEARS) ** 2) + 1e-3
                chosen.append(local_rng.choice(m, size=k, replace=len(m) < k, p=weight / weight.sum()))
            return np.concatenate(chosen)

        def batch(pool: list[np.ndarray], local_rng: np.random.Generator):
            """`groups` template locations; at each, one crop from k subjects of every site. The crops of
            a group share their location, so their posteriors differ by anatomy and by site, and the
            site-information term can tell the two apart."""
            xs, ms, cs, vs = [], [], [], []
            for _ in range(self.groups):
                corner = centres[local_rng.integers(len(centres))] - crop // 2
                sl = tuple(slice(int(a), int(a) + crop) for a in corner)
                core = tuple(slice(s.start + r, s.stop - r) for s in sl)
                who = members(pool, local_rng)
                xs.append(padded[(who, *sl)])
                ms.append(padded_mask[core])
                cs.append(coords_full[(slice(None), *core)])
                vs.append(covariates[who])
            # (G, B, c, c, c) crops, (G, V) core masks, (G, n_coord, c', c', c') coordinates, (G, B, c) covariates
            return (np.stack(xs), np.stack(ms).reshape(len(ms), -1), np.stack(cs),
                    np.stack(vs) if covariates.shape[1] else None)

        module = self._new_module().to(device)
        optimizer = torch.optim.Adam(module.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.steps, 1))
        gen = torch.Generator(device=device).manual_seed(self.seed)
        use_amp = self.amp and device.type == "cuda"
        train_pool = [np.flatnonzero((site_idx == s) & ~val) for s in range(n_sites)]
        if any(len(m) == 0 for m in train_pool):
            train_pool = [np.flatnonzero(site_idx == s) for s in range(n_sites)]
        val_pool = [np.flatnonzero((site_idx == s) & val) for s in range(n_sites)]
        val_rng = np.random.default_rng(self.seed + 1)
        val_batches = ([to_device(batch(val_pool, val_rng), device) for _ in range(8)]
                       if all(len(m) for m in val_pool) else [])
        loader = BatchPrefetcher(lambda: batch(train_pool, rng), self.prefetch, pin=device.type == "cuda")
        history = TrainingHistory()
        try:
            step, best_state = self._steps(module, optimizer, schedule, loader, val_batches, site_of_member, gen,
                                           use_amp, device, history, progress)
        finally:
            loader.close()
        if best_state is not None:
            module.load_state_dict(best_state)
        history.stopped_at = step
        module.eval()
        self.model_ = module.to("cpu")
        self.history_ = history

    def _steps(self, module, optimizer, schedule, loader, val_batches, site_of_member, gen, use_amp, device,
               history, progress) -> tuple[int, dict | None]:
        """The optimization loop with early stopping on the validation loss; returns the last step and the
        weights at the best validation loss (None without a validation split)."""
        best, best_state, bad = math.inf, None, 0
        step = 0
        terms_names = ("loss", "recon", "kl", "penalty", "site")
        for step in range(1, self.steps + 1):
            module.train()
            terms = self._loss(module, *to_device(loader.next(), device), site_of_member, gen, use_amp, device)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            values = {name: float(terms[name].detach()) for name in terms_names}
            if step % 10 == 0 or step == 1:
                history.step.append(step)
                for name in terms_names:
                    getattr(history, name).append(values[name])
            report = {"step": step, "steps": self.steps, **values}
            if val_batches and (step % self.eval_every == 0 or step == self.steps):
                module.eval()
                val_gen = torch.Generator(device=device).manual_seed(self.seed + 2)
                with torch.no_grad():
                    vloss = float(np.mean([float(self._loss(module, *vb, site_of_member, val_gen, use_amp,
                                                            device)["loss"]) for vb in val_batches]))
                history.val_step.append(step)
                history.val_loss.append(vloss)
                if vloss < best - 1e-4 * abs(best) or not math.isfinite(best):  # inf - inf is NaN
                    best, bad, history.best_step = vloss, 0, step
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    bad += 1
                if progress:
                    progress({**report, "val_loss": vloss})
                if bad >= self.patience:
                    break
            elif progress and step % 10 == 0:
                progress(report)
        return step, best_state

    def _loss(self, module, x, inside, coords, covariates, site_of_member, gen, use_amp, device) -> dict:
        """x (G, B, c, c, c) crops; inside (G, V) template mask of the crops' cores; coords (G, F, c', c', c');
        covariates (G, B, c) of the members (or None)."""
        n_groups, n_members = x.shape[:2]
        n_sites = len(self.sites_)
        r = RECEPTIVE_RADIUS
        onehot = torch.nn.functional.one_hot(site_of_member, n_sites).float()  # (B, S)
        n_vox = inside.shape[1]
        # per voxel, channels last, ordered (group, member, voxel)
        coords_v = coords.flatten(2).transpose(1, 2)[:, None].expand(-1, n_members, -1, -1)  # (G, B, V, F)
        site_v = onehot[None, :, None].expand(n_groups, -1, n_vox, -1)  # (G, B, V, S)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            features = module.trunk(x.reshape(-1, 1, *x.shape[2:]))  # (G*B, C, c', c', c')
            features = features.flatten(2).transpose(1, 2).reshape(n_groups, n_members, n_vox, -1)
            mu, logvar = module.posterior(features.reshape(-1, features.shape[-1]), site_v.reshape(-1, n_sites),
                                          coords_v.reshape(-1, coords_v.shape[-1]), self._logvar_range)
            eps = torch.randn(mu.shape, generator=gen, device=device, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * eps if module.training else mu
            recon = module.decode_voxels(z, site_v.reshape(-1, n_sites), coords_v.reshape(-1, coords_v.shape[-1]))
        target = x[:, :, r:-r, r:-r, r:-r].reshape(n_groups, n_members, n_vox)
        brain = inside[:, None].expand(-1, n_members, -1)
        # everything below in fp32: the penalty's exp/ratios lose too much in half precision
        recon = recon.float().reshape(n_groups, n_members, n_vox)
        recon_term = ((recon - target)[brain] ** 2).mean() / (2 * self.recon_sigma**2)
        d = mu.shape[1]
        mu = mu.float().reshape(n_groups, n_members, n_vox, d)
        logvar = logvar.float().reshape(n_groups, n_members, n_vox, d)
        kl_term = gaussian_kl_to_prior(mu[brain], logvar[brain]).mean()
        # Moyer et al.'s penalty: all pairs among brain voxels drawn from the whole batch
        flat_mu, flat_lv = mu[brain], logvar[brain]
        pick = torch.randperm(len(flat_mu), generator=gen, device=device)[: self.pairs]
        penalty = information_penalty(flat_mu[pick], flat_lv[pick])
        # the site term, on what is measured downstream: the harmonized output (decoded from mu, as at
        # apply time) of members that share a template location, with age and sex regressed out
        site_term = torch.zeros((), device=device)
        if self.site_weight:
            ref = torch.nn.functional.one_hot(torch.tensor([self.sites_.index(self.reference_site_)], device=device),
                                              n_sites).float()
            all_mu = mu.reshape(-1, d)
            flat_coords = coords_v.reshape(-1, coords_v.shape[-1])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = module.decode_voxels(all_mu, ref, flat_coords)
                own = module.decode_voxels(all_mu, site_v.reshape(-1, n_sites), flat_coords) \
                    if self.decode == "residual" else None
            out = out.float().reshape(n_groups, n_members, n_vox)
            if own is not None:
                out = target + out - own.float().reshape(n_groups, n_members, n_vox)
            site_term = site_variance_fraction(out, site_of_member, inside, covariates)
        loss = (1 + self.lam) * recon_term + self.beta * kl_term + self.lam * penalty \
            + self.site_weight * site_term
        return {"loss": loss, "recon": recon_term.detach(), "kl": kl_term.detach(), "penalty": penalty.detach(),
                "site": site_term.detach()}

    # ---- applying -----------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this InvariantHarmonizer is not fitted: call fit() or load() first")

    def covariates_needed(self) -> tuple[str, ...]:
        """The calibration keeps age and sex effects, so it needs them; the bare network does not."""
        return CALIBRATION_COVARIATES if self.calibrate == "combat" else ()

    def check_reference(self, reference_site: str | None) -> None:
        """Any training site can be the target of the network (its decoder is conditioned on the site); the
        ComBat calibration was fitted for the training reference."""
        self.site_code(reference_site or self.reference_site_)
        if self.calibration_ is not None and reference_site not in (None, self.reference_site_):
            raise ValueError(f"this model is calibrated to site {self.reference_site_!r}, not {reference_site!r}: "
                             f"refit with --reference-site {reference_site} (or with calibrate='none')")

    uses_gpu = True  # apply tasks ask for a GPU worker when the cluster has one
    needs_volume_context = True  # the per-subject intensity reference is read from the whole volume

    def subject_context(self, site: str, covariates: dict | None = None, volume: np.ndarray | None = None,
                        mask: np.ndarray | None = None) -> dict:
        """What every chunk of one subject needs: its site, its white-matter intensity reference and, for
        the calibration, its covariates (its own age/sex effects are kept)."""
        self.site_code(site)
        if volume is None or mask is None:
            raise ValueError("the invariant model needs the subject's volume and the mask for its intensity scale")
        context = {"site": str(site), "scale": float(white_matter_peak(volume, mask))}
        if self.calibration_ is not None:
            context["calibration"] = self.calibration_.subject_context(site, covariates)
        return context

    @torch.no_grad()
    def harmonize_block(self, block: np.ndarray, context: dict, location: tuple[slice, slice, slice],
                        reference_site: str | None = None) -> np.ndarray:
        """Harmonize one chunk given with a halo of `halo` voxels on every side (zeros beyond the grid).

        `context` comes from :meth:`subject_context`; `location` is the chunk's position in the grid
        *without* the halo; returns the chunk.
        """
        self._require_fitted()
        r = RECEPTIVE_RADIUS
        module = self.model_
        reference = reference_site or self.reference_site_
        site, scale = context["site"], context["scale"]
        src, ref = self.site_code(site), self.site_code(reference)
        device = next(module.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32) / np.float32(scale))
        x = x[None, None].to(device)
        core = x[0, 0, r:-r, r:-r, r:-r]
        out = torch.zeros_like(core)
        inside = core > 0  # background stays background; the heads run on brain voxels only
        if inside.any():
            features = module.trunk(x)[0].permute(1, 2, 3, 0)[inside]
            coords = torch.from_numpy(coordinate_features(location, self.grid_shape_)).to(device)
            coords = coords.permute(1, 2, 3, 0)[inside]
            onehot = torch.nn.functional.one_hot(torch.tensor([ref, src]), len(self.sites_)).float().to(device)
            z, _ = module.posterior(features, onehot[1:], coords, self._logvar_range)
            decoded = module.decode_voxels(z, onehot[:1], coords)
            if self.decode == "residual":
                decoded = core[inside] + decoded - module.decode_voxels(z, onehot[1:], coords)
            out[inside] = decoded
        out = (out.cpu().numpy() * np.float32(self.reference_scale_)).astype(np.float32)
        if self.calibration_ is not None and "calibration" in context:
            out = self.calibration_.harmonize_block(out, context["calibration"], location)
        return out

    def _whole_volume(self, volume: np.ndarray, context: dict, mask: np.ndarray,
                      reference_site: str | None = None) -> np.ndarray:
        padded = np.pad(np.asarray(volume, dtype=np.float32), RECEPTIVE_RADIUS)
        location = tuple(slice(0, n) for n in volume.shape)
        return self.harmonize_block(padded, context, location, reference_site) * mask

    def _harmonize_uncalibrated(self, volume: np.ndarray, site: str, mask: np.ndarray) -> np.ndarray:
        """The network's output alone (a context without the calibration's part)."""
        return self._whole_volume(volume, {"site": site, "scale": float(white_matter_peak(volume, mask))}, mask)

    def harmonize_volume(self, volume: np.ndarray, site: str, mask: np.ndarray,
                         reference_site: str | None = None, covariates: dict | None = None) -> np.ndarray:
        """Harmonize one whole volume in memory (the unchunked reference for the graph layer)."""
        context = self.subject_context(site, covariates, volume=volume, mask=mask)
        return self._whole_volume(volume, context, mask, reference_site)

    @torch.no_grad()
    def encode(self, volume: np.ndarray, site: str, mask: np.ndarray, voxels: np.ndarray | None = None,
               ) -> np.ndarray:
        """Posterior means of z for voxels of one whole volume: (n, latent_dim) float32.

        Each row is the mean of q(z | 7^3 neighbourhood, site, position) at one voxel, computed exactly as
        :meth:`harmonize_block` computes it (same intensity scale, zeros beyond the grid). `voxels` is a
        boolean (x, y, z) array of the voxels wanted (default: `mask`); rows follow its C order. For
        audits of how much site information z carries (:mod:`harmonize.evaluate`); nothing is decoded.
        """
        self._require_fitted()
        mask = np.asarray(mask, dtype=bool)
        wanted = mask if voxels is None else np.asarray(voxels, dtype=bool)
        if wanted.shape != tuple(np.shape(volume)):
            raise ValueError(f"voxels {wanted.shape} and volume {np.shape(volume)} differ in shape")
        module = self.model_
        device = next(module.parameters()).device
        scale = np.float32(white_matter_peak(volume, mask))
        padded = np.pad(np.asarray(volume, dtype=np.float32), RECEPTIVE_RADIUS) / scale
        x = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device)
        inside = torch.from_numpy(wanted).to(device)
        features = module.trunk(x)[0].permute(1, 2, 3, 0)[inside]
        location = tuple(slice(0, n) for n in wanted.shape)
        coords = torch.from_numpy(coordinate_features(location, self.grid_shape_)).to(device)
        coords = coords.permute(1, 2, 3, 0)[inside]
        onehot = torch.nn.functional.one_hot(torch.tensor([self.site_code(site)]), len(self.sites_)).float()
        mu, _ = module.posterior(features, onehot.to(device), coords, self._logvar_range)
        return mu.cpu().numpy().astype(np.float32)

    def transform(self, dataset: xr.Dataset, reference_site: str | None = None) -> xr.Dataset:
        """Return the dataset with a `harmonized` variable (eager; use harmonize.apply for stores)."""
        self._require_fitted()
        mask = np.asarray(dataset[S.MASK].values).astype(bool)
        sites = np.asarray(dataset[S.SITE].values).astype(str)
        names = [c for c in CALIBRATION_COVARIATES if c in dataset.coords]
        covariates = covariate_frame(dataset, names).to_dict("records")
        out = np.stack([self.harmonize_volume(np.asarray(dataset[S.IMAGES].isel({S.SUBJECT: i}).values),
                                              sites[i], mask, reference_site, covariates[i])
                        for i in range(dataset.sizes[S.SUBJECT])])
        return dataset.assign({S.HARMONIZED: (S.VOLUME_DIMS, out)})

    # ---- persistence (weights + JSON, no pickle) -------------------------------------------------
    def _checksum(self) -> str:
        digest = hashlib.sha256()
        for k, v in sorted(self.model_.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        digest.update(json.dumps(self._learned_json(), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def _learned_json(self) -> dict:
        return {"sites": self.sites_, "reference_site": self.reference_site_,
                "reference_scale": self.reference_scale_, "grid_shape": list(self.grid_shape_),
                "train_subjects": self.train_subjects_, "val_subjects": self.val_subjects_,
                "calibration": None if self.calibration_ is None else self.calibration_.checksum_}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `weights.safetensors`, `config.json` and `history.json` into the folder `path`."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model_.state_dict().items()},
                  str(path / "weights.safetensors"))
        config = {"kind": self.kind, "format": 1, "params": self.get_params(), "learned": self._learned_json(),
                  "checksum": self.checksum_}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        (path / "history.json").write_text(json.dumps(asdict(self.history_)))
        if self.calibration_ is not None:
            self.calibration_.save(path / CALIBRATION_DIR)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> InvariantHarmonizer:
        from harmonize.models.files import load_weights, read_config

        path = Path(path)
        config = read_config(path, MODEL_KIND)
        model = cls(**config["params"])
        learned = config["learned"]
        model.sites_ = list(learned["sites"])
        model.reference_site_ = learned["reference_site"]
        model.reference_scale_ = float(learned["reference_scale"])
        model.grid_shape_ = tuple(learned["grid_shape"])
        model.train_subjects_, model.val_subjects_ = learned["train_subjects"], learned["val_subjects"]
        model.calibration_ = VoxelComBat.load(path / CALIBRATION_DIR) if learned.get("calibration") else None
        if model.calibration_ is not None and model.calibration_.checksum_ != learned["calibration"]:
            raise ValueError(f"{path}: the calibration folder does not belong to this model (checksum mismatch)")
        module = PatchCVAE(len(model.sites_), model.latent_dim, model.channels, model.hidden)
        module.load_state_dict(load_weights(path / "weights.safetensors", load_file, device="cpu"))
        module.eval()
        model.model_ = module.to(select_device(device) if device == "auto" else torch.device(device))
        history = path / "history.json"
        model.history_ = TrainingHistory(**json.loads(history.read_text())) if history.exists() \
            else TrainingHistory()
        model.checksum_ = config["checksum"]
        if model._checksum() != model.checksum_:
            raise ValueError(f"{path}: weights do not match the checksum in config.json "
                             "(the model files are corrupt or were mixed up)")
        return model
