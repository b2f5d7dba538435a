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
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    var = logvar.exp()
    inv_var = (-logvar).exp()
    d = mu.shape[1]
    # sum_k var_ik / var_jk
    trace = var @ inv_var.T
    # sum_k (mu_ik - mu_jk)^2 / var_jk = sum_k mu_ik^2/var_jk - 2 mu_ik mu_jk/var_jk + mu_jk^2/var_jk
    quad = (mu * mu) @ inv_var.T - 2.0 * mu @ (mu * inv_var).T + (mu * mu * inv_var).sum(dim=1)[None, :]
    logdet = logvar.sum(dim=1)[None, :] - logvar.sum(dim=1)[:, None]  # log|S_j| - log|S_i|
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


def site_divergence(mu: torch.Tensor, logvar: torch.Tensor, site: torch.Tensor, n_sites: int) -> torch.Tensor:
    """Gaussian estimate of I(z; site) = sum_s p(s) KL(q(z|s) || q(z)) over a batch.

    q(z|s) and q(z) are the aggregate posteriors (moment-matched Gaussians: the covariance of the
    means plus the mean posterior variance) of the batch's voxels from site s and from all sites.
    The pairwise bound above limits I(z; x) >= I(z; site) only loosely: a per-voxel latent can keep a
    site signal too small to see in one voxel yet plain over a whole brain; this term measures that
    signal where it lives, in the sites' latent distributions.
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu, var = mu.double(), logvar.double().exp()
        d = mu.shape[1]
        eye = torch.eye(d, dtype=mu.dtype, device=mu.device)

        def moments(m: torch.Tensor, v: torch.Tensor):
            centre = m.mean(dim=0)
            dev = m - centre
            return centre, dev.T @ dev / max(len(m) - 1, 1) + torch.diag(v.mean(dim=0)) + 1e-6 * eye

        mean_all, cov_all = moments(mu, var)
        chol_all = torch.linalg.cholesky(cov_all)
        logdet_all = 2 * torch.log(torch.diagonal(chol_all)).sum()
        total = mu.new_zeros(())
        for s in range(n_sites):
            member = site == s
            if member.sum() < 2:
                continue
            mean_s, cov_s = moments(mu[member], var[member])
            diff = (mean_s - mean_all)[:, None]
            solved = torch.cholesky_solve(torch.cat([cov_s, diff], dim=1), chol_all)
            logdet_s = 2 * torch.log(torch.diagonal(torch.linalg.cholesky(cov_s))).sum()
            kl = 0.5 * (torch.trace(solved[:, :d]) + (diff * solved[:, d:]).sum() - d + logdet_all - logdet_s)
            total = total + member.double().mean() * kl
        return total.float()
