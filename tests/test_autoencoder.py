"""The KL autoencoder: the KL term against torch.distributions, the reparameterised sample's moments and gradients,
latent shapes per number of levels, the latent scale, and that it learns to reconstruct."""

import math

import pytest
import torch

from lessons_lib.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, autoencoder_loss, measure_scale_factor

TINY = dict(base_channels=8, num_res_blocks=1, latent_channels=2)


def test_kl_is_the_closed_form_of_two_gaussians():
    g = torch.Generator().manual_seed(0)
    mean, logvar = (torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, prior).flatten(1).sum(1)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected)
    assert DiagonalGaussian(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)).kl().item() == 0  # q = the prior


def test_reparameterised_samples_have_the_posterior_moments_and_carry_gradients():
    mean = torch.full((1, 1, 200, 200), 0.3, requires_grad=True)
    logvar = torch.full((1, 1, 200, 200), math.log(0.25), requires_grad=True)
    z = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(1))
    assert abs(z.mean().item() - 0.3) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    z.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))  # dz/dmean = 1
    eps = (z.detach() - 0.3) / 0.5
    torch.testing.assert_close(logvar.grad, 0.5 * 0.5 * eps)  # dz/dlogvar = std * eps / 2
    assert torch.equal(DiagonalGaussian(mean, logvar).mode(), mean)


@pytest.mark.parametrize("mults, latent", [((1,), (2, 28, 28)), ((1, 2), (2, 14, 14)), ((1, 2, 2), (2, 7, 7))])
def test_latent_and_reconstruction_shapes(mults, latent):
    model = Autoencoder(channel_mults=mults, **TINY)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (3, *latent) == posterior.logvar.shape
    assert model.config.latent_shape(28) == latent and model.decode(posterior.mode()).shape == x.shape


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="allowed: l1, l2"):
        AutoencoderConfig(reconstruction="l3")
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        AutoencoderConfig(kl_weight=-1)
    with pytest.raises(ValueError, match="scale_factor must be a finite number > 0"):
        AutoencoderConfig(scale_factor=0.0)
    with pytest.raises(ValueError, match="no scale_factor yet"):
        Autoencoder(**TINY).to_latent(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="not divisible by f = 8"):
        Autoencoder(channel_mults=(1, 2, 2, 2), **TINY).encode(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 2, h, w\)"):
        Autoencoder(**TINY).decode(torch.zeros(1, 3, 7, 7))


def test_the_scale_factor_gives_latents_of_unit_variance():
    torch.manual_seed(0)
    model = Autoencoder(**TINY).eval()
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    model.config.scale_factor = 1.0
    scale = measure_scale_factor(model, images, batch_size=16)
    assert model.config.scale_factor == scale
    assert abs(model.to_latent(images).std().item() - 1) < 1e-5  # what the diffusion model sees has unit variance


def test_it_learns_to_reconstruct_through_its_latent():
    """Sixteen images of two bright rectangles each. A decoder that ignored its latent could at best draw the
    per-pixel median image; after 150 Adam steps the reconstruction from q's mean must beat that by 2.5x."""
    g = torch.Generator().manual_seed(0)
    images = -torch.ones(16, 1, 28, 28)
    for img in images:
        for _ in range(2):
            top, left = torch.randint(0, 20, (2,), generator=g).tolist()
            img[:, top:top + 8, left:left + 6] = 1.0
    no_latent = (images - images.median(0).values).abs().mean().item()  # the best image that ignores x, in L1
    torch.manual_seed(0)
    model = Autoencoder(channel_mults=(1, 2), **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, parts = autoencoder_loss(model, images, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["kl"] > 0
    with torch.no_grad():
        error = (model.decode(model.encode(images).mode()) - images).abs().mean().item()
    assert error < no_latent / 2.5, (error, no_latent)
