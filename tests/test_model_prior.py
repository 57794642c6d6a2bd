"""The latent prior conditional on the product (``model/prior.py``): synthetic populations with a
known answer, the mixture, save/load, the population a generation draws, and the refit of a run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from stellarfield.model.generate import resolve_population
from stellarfield.model.prior import LatentPrior


@pytest.fixture(scope="module")
def two_populations():
    """3,000 latents of a big survey around (+3, 0) and 100 of a small one around (-3, 0), fitted."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3000, 2, generator=g) + torch.tensor([3.0, 0.0])
    small = 0.5 * torch.randn(100, 2, generator=g) + torch.tensor([-3.0, 0.0])
    z = torch.cat([big, small])
    index = torch.cat([torch.zeros(3000, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    prior = LatentPrior(2, transforms=2, hidden=(32, 32), products=["big_survey", "small_survey"])
    prior.fit(z, steps=400, seed=0, product_index=index)
    return prior


def test_each_product_samples_its_own_population(two_populations):
    prior = two_populations
    small = prior.sample(2000, seed=1, product="small_survey")
    big = prior.sample(2000, seed=1, product="big_survey")
    assert abs(float(small[:, 0].mean()) + 3) < 0.3 and abs(float(big[:, 0].mean()) - 3) < 0.3
    assert float(small[:, 0].std()) < 0.8 < float(big[:, 0].std())  # the small one is narrower, as drawn
    # without a product: the mixture, in the training shares (100 / 3,100 from the small survey)
    assert prior.product_weights.tolist() == pytest.approx([3000 / 3100, 100 / 3100])
    mixed = prior.sample(4000, seed=2)
    assert 0.01 < float((mixed[:, 0] < 0).float().mean()) < 0.07
    assert torch.equal(prior.sample(5, seed=3, product="small_survey"), prior.sample(5, seed=3, product="small_survey"))
    assert prior.sample(0).shape == (0, 2) and prior.sample(0, product="big_survey").shape == (0, 2)


def test_log_prob_of_a_population_and_of_the_mixture(two_populations):
    prior = two_populations
    z = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    own = prior.log_prob(z, ["small_survey", "big_survey"])
    other = prior.log_prob(z, ["big_survey", "small_survey"])
    assert (own > other + 5).all()
    mixture = prior.log_prob(z)
    w = prior.product_weights
    expected = torch.logsumexp(torch.stack([prior.log_prob(z, "big_survey") + w[0].log(),
                                            prior.log_prob(z, "small_survey") + w[1].log()]), 0)
    assert torch.allclose(mixture, expected, atol=1e-5)
    # a product the prior does not know (a new instrument): the mixture; an unknown population to sample: refused
    assert torch.allclose(prior.log_prob(z, ["new_instrument", None]), mixture)
    with pytest.raises(KeyError, match="small_survey"):
        prior.sample(3, product="new_instrument")
    assert (prior.anomaly_score(z[:1], "big_survey") > prior.anomaly_score(z[1:], "big_survey") + 2).all()


def test_a_conditional_prior_round_trips_through_its_config_and_state(two_populations):
    prior = two_populations
    config = json.loads(json.dumps(prior.config()))
    assert config["products"] == ["big_survey", "small_survey"]
    copy = LatentPrior(config["latent_dim"], config["transforms"], tuple(config["hidden"]), config.get("products"))
    copy.load_state_dict(prior.state_dict())
    assert torch.equal(copy.sample(7, seed=4, product="small_survey"), prior.sample(7, seed=4, product="small_survey"))
    assert torch.equal(copy.sample(7, seed=4), prior.sample(7, seed=4))


def test_an_unconditional_prior_is_unchanged_by_the_product_arguments():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=g)
    prior = LatentPrior(2, transforms=1, hidden=(16,))
    prior.fit(z, steps=50, seed=0)
    assert "products" not in prior.config() and not prior.conditional
    assert torch.equal(prior.log_prob(z[:4], "anything"), prior.log_prob(z[:4]))
    assert resolve_population(prior, "auto", "instrument:miles") is None
    with pytest.raises(KeyError, match="unconditional"):
        resolve_population(prior, "miles", "instrument:miles")


def test_a_population_of_a_handful_of_stars_is_not_used_by_default():
    """A product fitted to fewer than MIN_POPULATION latents: generation and the anomaly score use
    the mixture unless the population is asked for by name; the counts survive the config."""
    from stellarfield.model.prior import MIN_POPULATION

    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(500, 2, generator=g), torch.randn(3, 2, generator=g) + 5])
    index = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    prior = LatentPrior(2, transforms=1, hidden=(16,), products=["survey", "three_stars"])
    prior.fit(z, steps=30, seed=0, product_index=index)
    assert prior.counts == [500, 3] and 3 < MIN_POPULATION
    assert prior.has_population("survey") and not prior.has_population("three_stars")
    assert resolve_population(prior, "auto", "instrument:three_stars") is None
    assert resolve_population(prior, "three_stars", "custom") == "three_stars"
    assert torch.equal(prior.log_prob(z[:4], "three_stars"), prior.log_prob(z[:4]))
    config = json.loads(json.dumps(prior.config()))
    assert config["counts"] == [500, 3]
    old = {k: v for k, v in config.items() if k != "counts"}  # a prior saved before the counts: all populations
    assert LatentPrior(**{**old, "hidden": tuple(old["hidden"])}).has_population("three_stars")


def test_the_population_a_generation_draws(two_populations):
    prior = two_populations
    assert resolve_population(prior, "auto", "instrument:small_survey") == "small_survey"
    assert resolve_population(prior, "auto", "custom") is None  # a custom grid: every product's stars
    assert resolve_population(prior, "auto", "instrument:not_in_the_prior") is None
    assert resolve_population(prior, "all", "instrument:small_survey") is None
    assert resolve_population(prior, "big_survey", "instrument:small_survey") == "big_survey"
    with pytest.raises(KeyError, match="big_survey"):
        resolve_population(prior, "apogee", "custom")


def test_training_fits_a_prior_per_product_and_the_cli_refits_one(eval_run, eval_dataset, tmp_path, capsys):
    """A trained run's prior knows its products; ``stellarfield prior`` writes the same weights with
    a new prior, refuses an existing folder, and generation draws each product's population."""
    from stellarfield.cli import main
    from stellarfield.model import generate, load_model
    from stellarfield.model.checkpoint import load_checkpoint

    trained = load_model(eval_run)
    assert trained.prior.products == ["lamost_lrs", "miles"]
    out = tmp_path / "refit"
    assert main(["prior", "--model", str(eval_run), "--data", str(eval_dataset), "--out", str(out), "--steps", "30"]) == 0
    # the latents it fits take minutes on a survey: a progress bar with the count says so
    assert re.search(r"latents for the prior: 100%.*\d+/\d+", capsys.readouterr().err)
    refit = load_model(out)
    assert refit.prior.products == ["lamost_lrs", "miles"]
    weights = refit.prior.product_weights
    assert float(weights.sum()) == pytest.approx(1.0) and (weights > 0).all()
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, refit.model.state_dict()[name]), name
    recorded = load_checkpoint(out)["config"]["prior_refit"]
    assert recorded["steps"] == 30 and recorded["spectra"] == {"lamost_lrs": 48, "miles": 49}
    capsys.readouterr()
    assert main(["prior", "--model", str(eval_run), "--data", str(eval_dataset), "--out", str(out)]) != 0
    assert "exists" in capsys.readouterr().err
    # the model's own folder is never overwritten, even with --force (its checkpoints and train state)
    assert main(["prior", "--model", str(eval_run), "--data", str(eval_dataset), "--out", str(eval_run), "--force"]) != 0
    assert "own run folder" in capsys.readouterr().err
    assert trained.prior.passes == 2 and refit.prior.passes == 2  # coupling layers, the default
    # to the run's own latent table, as training fits it: the same prior as the end of training, whatever the flow
    table = tmp_path / "table"
    assert main(["prior", "--model", str(eval_run), "--data", str(eval_dataset), "--out", str(table), "--from-table"]) == 0
    again = load_model(table)
    z = torch.randn(4, again.model.latent_dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.prior.log_prob(z, "miles"), trained.prior.log_prob(z, "miles"))
    assert load_checkpoint(table)["config"]["prior_refit"]["latent_table"] == len(trained.model.latents.weight)
    layout = load_checkpoint(eval_run)["config"]["latent_layout"]  # checked against the data given
    assert len(layout) == 8 and load_checkpoint(table)["config"]["latent_layout"] == layout
    assert load_checkpoint(table)["step"] == load_checkpoint(eval_run)["step"] > 0  # the weights' own step
    assert main(["prior", "--model", str(eval_run), "--data", str(eval_dataset), "--out", str(tmp_path / "ar"),
                 "--from-table", "--flow", "autoregressive"]) == 0
    assert load_model(tmp_path / "ar").prior.passes is None
    assert load_checkpoint(tmp_path / "ar")["config"]["prior"]["passes"] is None
    # an exported model keeps no table: refused with the reason
    assert main(["prior", "--model", "reference", "--data", str(eval_dataset), "--out", str(tmp_path / "ref"),
                 "--from-table"]) != 0
    assert "no latent table" in capsys.readouterr().err
    a = generate(refit, 3, instrument="miles", seed=1)
    b = generate(refit, 3, instrument="miles", seed=1, population="miles")
    c = generate(refit, 3, instrument="miles", seed=1, population="lamost_lrs")
    assert np.array_equal(a.latents, b.latents) and not np.array_equal(a.latents, c.latents)


@pytest.mark.parametrize("passes", [None, 2])
def test_autoregressive_and_coupling_priors_learn_a_correlated_gaussian(passes):
    """Both kinds of flow (``passes``: None autoregressive, 2 coupling) fit held-out draws of a known
    6-d correlated Gaussian about as well as its true density, and round-trip through config and state."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=g) * 0.5 + 2.0 * torch.eye(6)
    truth = torch.distributions.MultivariateNormal(torch.arange(6.0), scale_tril=torch.linalg.cholesky(mixing @ mixing.T))
    torch.manual_seed(0)
    train, held_out = truth.sample((4000,)), truth.sample((1000,))
    prior = LatentPrior(6, transforms=3, hidden=(32, 32), passes=passes)
    prior.fit(train, steps=600, seed=0)
    gap = float(truth.log_prob(held_out).mean() - prior.log_prob(held_out).mean()) / 6  # nats per dimension
    assert -0.03 < gap < 0.03  # an unfitted flow (standardisation only): 0.19-0.21; 20 steps: 0.035-0.049
    config = json.loads(json.dumps(prior.config()))
    assert config["passes"] == passes
    copy = LatentPrior(config["latent_dim"], config["transforms"], tuple(config["hidden"]), passes=config["passes"])
    copy.load_state_dict(prior.state_dict())
    assert torch.equal(copy.sample(5, seed=1), prior.sample(5, seed=1))
    other = LatentPrior(6, transforms=3, hidden=(32, 32), passes=None if passes else 2)
    with pytest.raises(ValueError, match="passes"):  # the other kind's masks never load silently
        other.load_state_dict(prior.state_dict())
    drawn = prior.sample(4000, seed=2)
    assert torch.allclose(drawn.mean(0), truth.mean, atol=0.25)
    assert torch.allclose(torch.cov(drawn.T), truth.covariance_matrix, atol=0.1 * float(truth.covariance_matrix.max()))
