"""The information penalty against a brute-force double loop, entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonize.models.penalty import (
    gaussian_kl_to_prior,
    information_penalty,
    matched_site_kl,
    pairwise_gaussian_kl,
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


def test_matched_site_kl_is_the_cross_site_mean_at_each_location():
    """Groups of one subject per site at one location: the mean over valid voxels and ordered site
    pairs s != t of KL(q_s || q_t), checked against the double loop."""
    rng = np.random.default_rng(1)
    groups, sites, voxels, d = 3, 4, 5, 3
    mu = rng.normal(0, 1.5, size=(groups, sites, voxels, d))
    logvar = rng.uniform(-4, 1, size=(groups, sites, voxels, d))
    valid = rng.random((groups, voxels)) < 0.7
    total, count = 0.0, 0
    for g in range(groups):
        for v in np.flatnonzero(valid[g]):
            kl = brute_force_kl(mu[g, :, v], logvar[g, :, v])
            total += kl.sum()  # the diagonal is zero
            count += sites * (sites - 1)
    got = float(matched_site_kl(torch.tensor(mu), torch.tensor(logvar), torch.tensor(valid)))
    assert got == pytest.approx(total / count, rel=1e-10)
    # identical posteriors across sites (a site-invariant encoder) give zero
    same = np.broadcast_to(mu[:, :1], mu.shape).copy()
    same_lv = np.broadcast_to(logvar[:, :1], mu.shape).copy()
    assert abs(float(matched_site_kl(torch.tensor(same), torch.tensor(same_lv), torch.tensor(valid)))) < 1e-15
