"""The information penalty of Moyer et al. (2018): pairwise KL between the encoder's posteriors.

For diagonal Gaussians q_i = N(mu_i, diag(exp(lv_i))):

    KL(q_i || q_j) = 1/2 sum_k [ lv_jk - lv_ik + (exp(lv_ik) + (mu_ik - mu_jk)^2) / exp(lv_jk) - 1 ]

The B x B matrix is built from three matrix products (O(B^2 d) time, O(B^2) memory, never B x B x d).
The log-determinant term is lv_j - lv_i with this sign: in the full B x B mean it cancels, so
published code that flips it looks right there, but any masked or weighted mean (e.g. cross-site
pairs only) needs the correct sign, which the brute-force test checks per entry.
"""

from __future__ import annotations

import torch


def pairwise_gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Matrix K with K[i, j] = KL(q_i || q_j), computed in float32 or wider (never half precision)."""
    # autocast would run these matmuls in half precision even on fp32 inputs: switch it off here
    with torch.autocast(device_type=mu.device.type, enabled=False):
        return _pairwise_kl(mu, logvar)


def _pairwise_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(..., B, d) -> (..., B, B); leading dimensions are batches of independent sets."""
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    var = logvar.exp()
    inv_var = (-logvar).exp()
    d = mu.shape[-1]
    t = lambda a: a.transpose(-1, -2)  # noqa: E731
    # sum_k var_ik / var_jk
    trace = var @ t(inv_var)
    # sum_k (mu_ik - mu_jk)^2 / var_jk = sum_k mu_ik^2/var_jk - 2 mu_ik mu_jk/var_jk + mu_jk^2/var_jk
    quad = (mu * mu) @ t(inv_var) - 2.0 * mu @ t(mu * inv_var) + (mu * mu * inv_var).sum(-1)[..., None, :]
    total = logvar.sum(-1)
    logdet = total[..., None, :] - total[..., :, None]  # log|S_j| - log|S_i|
    return 0.5 * (trace + quad + logdet - d)


def information_penalty(mu: torch.Tensor, logvar: torch.Tensor, weights: torch.Tensor | None = None,
                        ) -> torch.Tensor:
    """Mean pairwise KL, an upper bound (up to a constant) on I(z; x) and hence on I(z; site).

    `weights` (B x B, optional) restricts or reweights the pairs, e.g. to cross-site pairs.
    """
    kl = pairwise_gaussian_kl(mu, logvar)
    if weights is None:
        return kl.mean()
    weights = weights.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1e-12)


def gaussian_kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per row, in float32 or wider."""
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def site_variance_fraction(values: torch.Tensor, site: torch.Tensor, valid: torch.Tensor,
                           covariates: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid voxels of the share of the members' variance that site explains (partial eta²).

    values: (G, B, V), B members (several per site) at the same V template voxels of group g;
    site: (B,) labels; valid: (G, V); covariates: (G, B, c) or None, biological covariates (age, sex)
    that site must not be credited with: with them, the share is of the variance left after
    regressing them out, (RSS_without_site - RSS_with_site) / RSS_without_site, as ComBat estimates
    site effects beside the covariates. A linear site classifier on images feeds on consistent
    differences of site means, voxel after voxel: this measures that, normalized per voxel so that
    shrinking everything does not pay.
    """
    values = values.float()
    n_groups, n_members = values.shape[:2]
    n_sites = int(site.max()) + 1
    onehot = torch.nn.functional.one_hot(site, n_sites).to(values.dtype)  # (B, S)
    base = torch.ones(n_groups, n_members, 1, dtype=values.dtype, device=values.device)
    if covariates is not None:
        cov = covariates.to(values.dtype)
        cov = (cov - cov.mean(1, keepdim=True)) / cov.std(1, keepdim=True).clamp_min(1e-6)
        base = torch.cat([base, cov], dim=2)
    full = torch.cat([base, onehot[None, :, 1:].expand(n_groups, -1, -1)], dim=2)

    def projector(design: torch.Tensor) -> torch.Tensor:  # (G, B, B) onto the design's column space
        return design @ torch.linalg.pinv(design)

    rss_reduced = (values * ((torch.eye(n_members, device=values.device) - projector(base)) @ values)).sum(1)
    explained = (values * ((projector(full) - projector(base)) @ values)).sum(1)
    fraction = explained / (rss_reduced + 1e-6)
    valid = valid.to(values.dtype)
    return (fraction * valid).sum() / valid.sum().clamp_min(1.0)
