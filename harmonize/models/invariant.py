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
from harmonize.models.intensity import white_matter_peak
from harmonize.models.penalty import gaussian_kl_to_prior, information_penalty, matched_site_kl

MODEL_KIND = "invariant"
_N_COORD_FREQ = 2
RECEPTIVE_RADIUS = 3  # three 3x3x3 valid convolutions


def select_device(preference: str = "auto") -> torch.device:
    """'auto' takes the GPU this process was given (a Dask GPU worker sees its own as cuda:0), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def coordinate_features(location: tuple[slice, slice, slice], grid_shape: tuple[int, int, int],
                        ) -> np.ndarray:
    """Smooth functions of template position, (n_features, *block) float32, for a block of the grid."""
    axes = []
    for sl, n in zip(location, grid_shape, strict=True):
        idx = np.arange(sl.start, sl.stop, dtype=np.float32)
        axes.append(2.0 * idx / max(n - 1, 1) - 1.0)
    grids = np.meshgrid(*axes, indexing="ij")
    feats = list(grids)
    for f in range(1, _N_COORD_FREQ + 1):
        for g in grids:
            feats += [np.sin(np.pi * f * g / 2), np.cos(np.pi * f * g / 2)]
    return np.stack(feats).astype(np.float32)


N_COORD_FEATURES = 3 + 3 * 2 * _N_COORD_FREQ


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
        # decoder = a scanner model around a site-free anatomy network:
        #   x = exp(bias_site(position)) * gain_site * anatomy(z, position) ** gamma_site
        # so what differs between sites (a smooth bias field, gain, an intensity non-linearity) can only
        # be said through the site code, and z is left to carry anatomy
        self.anatomy = nn.Sequential(
            nn.Linear(latent_dim + N_COORD_FEATURES, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1), nn.Softplus(),
        )
        self.bias_field = nn.Sequential(
            nn.Linear(n_sites + N_COORD_FEATURES, 32), nn.SiLU(), nn.Linear(32, 1),
        )
        self.log_gain = nn.Parameter(torch.zeros(n_sites))
        self.log_gamma = nn.Parameter(torch.zeros(n_sites))

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
        anatomy = self.anatomy(torch.cat([z, coords], dim=1))[:, 0] + 1e-4
        log_bias = self.bias_field(torch.cat([site, coords], dim=1))[:, 0]
        gamma = (site @ self.log_gamma.to(z.dtype)).exp()
        return (log_bias + site @ self.log_gain.to(z.dtype) + gamma * anatomy.log()).exp()


def _voxels(t: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B*X*Y*Z, C), channels last."""
    return t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])


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


class InvariantHarmonizer:
    """Site-invariant conditional VAE harmonizer with the scikit-learn estimator face.

    Parameters are plain values (saved in the model's JSON config); learned state ends in `_`.
    """

    kind = MODEL_KIND
    halo = RECEPTIVE_RADIUS

    def __init__(self, latent_dim: int = 8, channels: int = 16, hidden: int = 64, lam: float = 1.0,
                 beta: float = 1.0, recon_sigma: float = 0.05, crop: int = 16, crops_per_site: int = 4,
                 steps: int = 800, lr: float = 2e-3, pairs: int = 512, decode: str = "residual",
                 reference_site: str | None = None, max_subjects_per_site: int = 16,
                 val_fraction: float = 0.2, eval_every: int = 50, patience: int = 6, seed: int = 0,
                 device: str = "auto", amp: bool = True, logvar_min: float = -8.0, logvar_max: float = 4.0,
                 torch_threads: int | None = None, site_weight: float = 10.0):
        self.latent_dim, self.channels, self.hidden = latent_dim, channels, hidden
        self.lam, self.beta, self.recon_sigma = lam, beta, recon_sigma
        self.crop, self.crops_per_site, self.steps, self.lr, self.pairs = crop, crops_per_site, steps, lr, pairs
        self.decode, self.reference_site = decode, reference_site
        self.max_subjects_per_site, self.val_fraction = max_subjects_per_site, val_fraction
        self.eval_every, self.patience, self.seed = eval_every, patience, seed
        self.device, self.amp, self.logvar_min, self.logvar_max = device, amp, logvar_min, logvar_max
        self.torch_threads = torch_threads
        self.site_weight = site_weight

    # ---- parameters ---------------------------------------------------------------------------
    _PARAMS = ("latent_dim", "channels", "hidden", "lam", "beta", "recon_sigma", "crop", "crops_per_site",
               "steps", "lr", "pairs", "decode", "reference_site", "max_subjects_per_site", "val_fraction",
               "eval_every", "patience", "seed", "device", "amp", "logvar_min", "logvar_max", "torch_threads",
               "site_weight")

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params) -> InvariantHarmonizer:
        for k, v in params.items():
            if k not in self._PARAMS:
                raise ValueError(f"unknown parameter {k!r} for InvariantHarmonizer; known: {self._PARAMS}")
            setattr(self, k, v)
        return self

    @property
    def _logvar_range(self) -> tuple[float, float]:
        return (self.logvar_min, self.logvar_max)

    def _check_params(self) -> None:
        if self.decode not in ("residual", "direct"):
            raise ValueError(f"decode must be 'residual' or 'direct', got {self.decode!r}")
        if self.crop <= 2 * RECEPTIVE_RADIUS:
            raise ValueError(f"crop must exceed {2 * RECEPTIVE_RADIUS} voxels, got {self.crop}")
        if self.lam < 0 or self.beta < 0:
            raise ValueError("lam and beta must be >= 0")

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
            self._train(volumes, site_idx, val, mask, device, rng, progress)
        finally:
            torch.set_num_threads(old_threads)
        self.history_.seconds = time.perf_counter() - t0
        return self

    def _new_module(self) -> PatchCVAE:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            return PatchCVAE(len(self.sites_), self.latent_dim, self.channels, self.hidden)

    def _train(self, volumes, site_idx, val, mask, device, rng, progress) -> None:
        crop, r = self.crop, RECEPTIVE_RADIUS
        pad = crop // 2
        padded = [np.pad(v, pad) for v in volumes]
        padded_mask = np.pad(mask, pad)
        coords_full = coordinate_features(tuple(slice(-pad, n + pad) for n in mask.shape), mask.shape)
        centres = np.argwhere(mask) + pad
        n_sites = len(self.sites_)
        by_site = [np.flatnonzero((site_idx == s) & ~val) for s in range(n_sites)]
        if any(len(m) == 0 for m in by_site):
            by_site = [np.flatnonzero(site_idx == s) for s in range(n_sites)]

        def batch(groups: list[np.ndarray], local_rng: np.random.Generator):
            """One crop location per group, cut from every subject of the group (one per site), so the
            sites' latent distributions in a batch are compared over the same anatomy."""
            xs, ms, cs, ss = [], [], [], []
            for subjects in groups:
                c = centres[local_rng.integers(len(centres))] - crop // 2
                sl = tuple(slice(int(a), int(a) + crop) for a in c)
                core = tuple(slice(s.start + r, s.stop - r) for s in sl)
                for subj in subjects:
                    xs.append(padded[subj][sl])
                    ms.append(padded_mask[core])
                    cs.append(coords_full[(slice(None), *core)])
                    ss.append(np.full(padded_mask[core].shape, site_idx[subj]))
            inside = torch.from_numpy(np.stack(ms).reshape(-1)).to(device)
            x = torch.from_numpy(np.stack(xs)[:, None]).to(device)
            coords = _voxels(torch.from_numpy(np.stack(cs)))[inside.cpu()].to(device)
            site = torch.from_numpy(np.stack(ss).reshape(-1))[inside.cpu()].to(device)
            return x, inside, coords, site

        module = self._new_module().to(device)
        optimizer = torch.optim.Adam(module.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.steps, 1))
        gen = torch.Generator(device=device).manual_seed(self.seed)
        use_amp = self.amp and device.type == "cuda"
        val_rng = np.random.default_rng(self.seed + 1)
        val_by_site = [np.flatnonzero((site_idx == s) & val) for s in range(n_sites)]
        val_batches = [batch([np.array([val_rng.choice(m) for m in val_by_site]) for _ in range(8)], val_rng)
                       for _ in range(4)] if all(len(m) for m in val_by_site) else []
        history = TrainingHistory()
        best, best_state, bad = math.inf, None, 0
        step = 0
        for step in range(1, self.steps + 1):
            groups = [np.array([rng.choice(m) for m in by_site]) for _ in range(self.crops_per_site)]
            module.train()
            terms = self._loss(module, *batch(groups, rng), gen, use_amp, device)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            if step % 10 == 0 or step == 1:
                history.step.append(step)
                for k in ("loss", "recon", "kl", "penalty", "site"):
                    getattr(history, k).append(float(terms[k].detach()))
            if val_batches and (step % self.eval_every == 0 or step == self.steps):
                module.eval()
                with torch.no_grad():
                    vloss = float(np.mean([float(self._loss(module, *vb, gen, use_amp, device)["loss"])
                                           for vb in val_batches]))
                history.val_step.append(step)
                history.val_loss.append(vloss)
                if vloss < best - 1e-4 * abs(best) or not math.isfinite(best):  # inf - inf is NaN
                    best, bad, history.best_step = vloss, 0, step
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    bad += 1
                if progress:
                    progress({"step": step, "steps": self.steps, "loss": float(terms["loss"].detach()),
                              "recon": float(terms["recon"]), "kl": float(terms["kl"]),
                              "penalty": float(terms["penalty"]), "site": float(terms["site"]), "val_loss": vloss})
                if bad >= self.patience:
                    break
            elif progress and step % 10 == 0:
                progress({"step": step, "steps": self.steps, "loss": float(terms["loss"].detach()),
                          "recon": float(terms["recon"]), "kl": float(terms["kl"]),
                          "penalty": float(terms["penalty"]), "site": float(terms["site"])})
        history.stopped_at = step
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        self.model_ = module.to("cpu")
        self.history_ = history
        self.checksum_ = self._checksum()

    def _loss(self, module, x, inside, coords, site, gen, use_amp, device) -> dict:
        n_sites = len(self.sites_)
        onehot = torch.nn.functional.one_hot(site, n_sites).float()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            features = _voxels(module.trunk(x))[inside]
            mu, logvar = module.posterior(features, onehot, coords, self._logvar_range)
            eps = torch.randn(mu.shape, generator=gen, device=device, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * eps if module.training else mu
            recon = module.decode_voxels(z, onehot, coords)
        r = RECEPTIVE_RADIUS
        target = _voxels(x[:, :, r:-r, r:-r, r:-r])[inside][:, 0]
        # everything below in fp32: the penalty's exp/ratios lose too much in half precision
        recon_term = ((recon.float() - target) ** 2).mean() / (2 * self.recon_sigma**2)
        mu, logvar = mu.float(), logvar.float()
        kl_term = gaussian_kl_to_prior(mu, logvar).mean()
        pick = torch.randperm(len(mu), generator=gen, device=device)[: self.pairs]
        penalty = information_penalty(mu[pick], logvar[pick])
        if self.site_weight and x.shape[0] % n_sites == 0:
            # batches hold groups of one subject per site cut at one location: compare them voxel by voxel
            groups = x.shape[0] // n_sites
            full_mu = mu.new_zeros((len(inside), mu.shape[1])).index_put((inside,), mu)
            full_lv = logvar.new_zeros((len(inside), mu.shape[1])).index_put((inside,), logvar)
            shape = (groups, n_sites, -1, mu.shape[1])
            valid = inside.reshape(groups, n_sites, -1)[:, 0]
            site_term = matched_site_kl(full_mu.reshape(shape), full_lv.reshape(shape), valid)
        else:
            site_term = torch.zeros((), device=device)
        loss = (1 + self.lam) * recon_term + self.beta * kl_term + self.lam * penalty \
            + self.site_weight * site_term
        return {"loss": loss, "recon": recon_term.detach(), "kl": kl_term.detach(), "penalty": penalty.detach(),
                "site": site_term.detach()}

    # ---- applying -----------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this InvariantHarmonizer is not fitted: call fit() or load() first")

    def site_code(self, site: str) -> int:
        self._require_fitted()
        if site not in self.sites_:
            raise ValueError(f"site {site!r} was not seen in training (sites: {self.sites_}); "
                             "refit with subjects from that site")
        return self.sites_.index(site)

    def subject_scale(self, volume: np.ndarray, mask: np.ndarray) -> float:
        return white_matter_peak(volume, mask)

    @torch.no_grad()
    def harmonize_block(self, block: np.ndarray, site: str, scale: float,
                        location: tuple[slice, slice, slice], reference_site: str | None = None) -> np.ndarray:
        """Harmonize one chunk given with a halo of `halo` voxels on every side (zeros beyond the grid).

        `location` is the chunk's position in the grid *without* the halo; returns the chunk.
        """
        self._require_fitted()
        r = RECEPTIVE_RADIUS
        module = self.model_
        reference = reference_site or self.reference_site_
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
        return (out.cpu().numpy() * np.float32(self.reference_scale_)).astype(np.float32)

    def harmonize_volume(self, volume: np.ndarray, site: str, mask: np.ndarray,
                         reference_site: str | None = None) -> np.ndarray:
        """Harmonize one whole volume in memory (the unchunked reference for the graph layer)."""
        scale = self.subject_scale(volume, mask)
        padded = np.pad(np.asarray(volume, dtype=np.float32), RECEPTIVE_RADIUS)
        location = tuple(slice(0, n) for n in volume.shape)
        return self.harmonize_block(padded, site, scale, location, reference_site) * mask

    def transform(self, dataset: xr.Dataset, reference_site: str | None = None) -> xr.Dataset:
        """Return the dataset with a `harmonized` variable (eager; use harmonize.apply for stores)."""
        self._require_fitted()
        mask = np.asarray(dataset[S.MASK].values).astype(bool)
        sites = np.asarray(dataset[S.SITE].values).astype(str)
        out = np.stack([self.harmonize_volume(np.asarray(dataset[S.IMAGES].isel({S.SUBJECT: i}).values),
                                              sites[i], mask, reference_site)
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
                "train_subjects": self.train_subjects_, "val_subjects": self.val_subjects_}

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
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> InvariantHarmonizer:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("kind") != MODEL_KIND:
            raise ValueError(f"{path} holds a {config.get('kind')!r} model, not {MODEL_KIND!r}")
        model = cls(**config["params"])
        learned = config["learned"]
        model.sites_ = list(learned["sites"])
        model.reference_site_ = learned["reference_site"]
        model.reference_scale_ = float(learned["reference_scale"])
        model.grid_shape_ = tuple(learned["grid_shape"])
        model.train_subjects_, model.val_subjects_ = learned["train_subjects"], learned["val_subjects"]
        module = PatchCVAE(len(model.sites_), model.latent_dim, model.channels, model.hidden)
        module.load_state_dict(load_file(str(path / "weights.safetensors"), device="cpu"))
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
