"""The information penalty against a brute-force double loop, entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonize.models.penalty import (
    gaussian_kl_to_prior,
    information_penalty,
    pairwise_gaussian_kl,
    site_variance_fraction,
)


def brute_force_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    b, d = mu.shape
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            vi, vj = np.exp(logvar[i]), np.exp(logvar[j])
            out[i, j] = 0.5 * np.sum(np.log(vj / vi) + (vi + (mu[i] - mu[j]) ** 2) / vj - 1.0)
    return out


@pytest.fixture()
def posteriors():
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 2, size=(17, 5))
    logvar = rng.uniform(-3, 2, size=(17, 5))
    return mu, logvar


def test_pairwise_kl_matches_double_loop_per_entry(posteriors):
    mu, logvar = posteriors
    got = pairwise_gaussian_kl(torch.tensor(mu), torch.tensor(logvar)).numpy()
    np.testing.assert_allclose(got, brute_force_kl(mu, logvar), rtol=1e-10, atol=1e-10)
    assert np.allclose(np.diag(got), 0.0, atol=1e-12)
    # the log-determinant sign matters off the diagonal: KL is not symmetric
    assert not np.allclose(got, got.T)


def test_pairwise_kl_matches_torch_distributions(posteriors):
    mu, logvar = map(torch.tensor, posteriors)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.stack([torch.distributions.kl_divergence(
        torch.distributions.Normal(mu[i], (0.5 * logvar[i]).exp()), q).sum(-1) for i in range(len(mu))])
    np.testing.assert_allclose(pairwise_gaussian_kl(mu, logvar).numpy(), ref.numpy(), rtol=1e-9, atol=1e-9)


def test_masked_penalty_cross_site_pairs(posteriors):
    """A masked mean (here: from reference-site posteriors to the other sites') is where a flipped
    log-determinant sign would show; in the full B x B mean it cancels."""
    mu, logvar = posteriors
    site = np.arange(len(mu)) % 3
    weights = ((site[:, None] == 0) & (site[None, :] != 0)).astype(float)
    got = float(information_penalty(torch.tensor(mu), torch.tensor(logvar), torch.tensor(weights)))
    brute = brute_force_kl(mu, logvar)
    expected = (brute * weights).sum() / weights.sum()
    assert got == pytest.approx(expected, rel=1e-10)
    total_logvar = logvar.sum(axis=1)
    flipped = brute - (total_logvar[None, :] - total_logvar[:, None])  # the published sign error
    assert flipped.mean() == pytest.approx(brute.mean(), rel=1e-12)  # invisible in the full mean...
    assert abs((flipped * weights).sum() / weights.sum() - expected) > 1e-3  # ...not in a masked one


def test_full_mean_equals_loop_mean(posteriors):
    mu, logvar = posteriors
    got = float(information_penalty(torch.tensor(mu), torch.tensor(logvar)))
    assert got == pytest.approx(brute_force_kl(mu, logvar).mean(), rel=1e-10)


def test_penalty_stays_fp32_and_finite_under_autocast():
    torch.manual_seed(0)
    mu = torch.randn(64, 8, dtype=torch.bfloat16)
    logvar = torch.full((64, 8), -8.0, dtype=torch.bfloat16)  # the clamp floor: 1/sigma^2 ~ 3000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = pairwise_gaussian_kl(mu, logvar)
        prior = gaussian_kl_to_prior(mu, logvar)
    assert kl.dtype == torch.float32 and prior.dtype == torch.float32
    assert torch.isfinite(kl).all()
    ref = pairwise_gaussian_kl(mu.double(), logvar.double())
    # fp32 accuracy: entries reach ~1e4 here, so an absolute 1e-2 is ~1e-6 relative
    np.testing.assert_allclose(kl.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-2)


def test_kl_to_prior_zero_at_prior():
    assert float(gaussian_kl_to_prior(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max()) == 0.0


def test_site_variance_fraction_is_the_partial_eta_squared_per_voxel():
    """Per group and voxel: (RSS without site - RSS with site) / RSS without site, from two least-squares
    fits with the covariates in both, averaged over valid voxels; checked against numpy's lstsq."""
    rng = np.random.default_rng(1)
    groups, n_sites, per_site, voxels = 3, 4, 3, 5
    members = n_sites * per_site
    site = np.repeat(np.arange(n_sites), per_site)
    covariates = rng.normal(size=(groups, members, 2))
    values = rng.normal(size=(groups, members, voxels)) + 0.7 * site[None, :, None] \
        + 0.5 * covariates[:, :, :1]
    valid = rng.random((groups, voxels)) < 0.7
    fractions = []
    for g in range(groups):
        cov = (covariates[g] - covariates[g].mean(0)) / covariates[g].std(0, ddof=1)
        base = np.column_stack([np.ones(members), cov])
        full = np.column_stack([base, np.eye(n_sites)[site][:, 1:]])
        for v in np.flatnonzero(valid[g]):
            y = values[g, :, v]
            rss = [np.sum((y - design @ np.linalg.lstsq(design, y, rcond=None)[0]) ** 2) for design in (base, full)]
            fractions.append((rss[0] - rss[1]) / rss[0])
    got = float(site_variance_fraction(torch.tensor(values, dtype=torch.float64), torch.tensor(site),
                                       torch.tensor(valid), torch.tensor(covariates, dtype=torch.float64)))
    assert got == pytest.approx(np.mean(fractions), rel=1e-4)
    assert 0.2 < got < 1.0  # site was made to matter
    # values whose site means are equal (noise centred within each site) give zero without covariates
    noise = rng.normal(size=values.shape)
    for s in range(n_sites):
        noise[:, site == s] -= noise[:, site == s].mean(axis=1, keepdims=True)
    got = float(site_variance_fraction(torch.tensor(noise + 3.0), torch.tensor(site), torch.tensor(valid)))
    assert abs(got) < 1e-5
