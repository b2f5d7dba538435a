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


def matched_site_kl(mu: torch.Tensor, logvar: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean KL(q(z|x_gsv) || q(z|x_gtv)) over sites s != t, for each group g and voxel v with valid[g, v].

    mu, logvar: (G, S, V, d), one subject per site in each group, the same template location v:
    the information penalty restricted to cross-site pairs at matched anatomy. On template-space
    images, two subjects at one location differ by anatomy (which the decoder cannot recover without
    z) and by scanner (which it can, from the site code); so this term takes the scanner out of z
    first. It measures I(z; site | location) where the all-pairs bound above is loose.
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        dtype = torch.promote_types(mu.dtype, torch.float32)
        mu, logvar = mu.to(dtype), logvar.to(dtype)
        n_sites = mu.shape[1]
        if n_sites < 2:
            return mu.new_zeros(())
        mu_i, mu_j = mu[:, :, None], mu[:, None, :]
        lv_i, lv_j = logvar[:, :, None], logvar[:, None, :]
        kl = 0.5 * (lv_j - lv_i + ((lv_i.exp() + (mu_i - mu_j) ** 2) * (-lv_j).exp()) - 1.0).sum(dim=-1)
        # kl: (G, S, S, V); its diagonal (s == t) is zero and left out of the count
        valid = valid[:, None, None, :].to(dtype)
        return (kl * valid).sum() / (valid.sum() * n_sites * (n_sites - 1)).clamp_min(1.0)
