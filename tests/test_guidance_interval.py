"""Limited-interval guidance: the noise-level scale, NFE bookkeeping, bit-identical unguided steps."""
import pytest
import torch

from dits.diffusion import sample as diffusion_sample
from dits.diffusion.guidance import diffusion_noise_level, guided_model, parse_interval
from dits.diffusion.schedule import Schedule
from dits.errors import UserError
from dits.objectives import count_nfe, evaluation_levels, sample


class ToyModel:
    """A class-conditional 'network' with known outputs; counts calls and rows (samples evaluated)."""
    num_classes = 3

    def __init__(self, channels_out=1):
        self.calls, self.rows, self.c_out = 0, 0, channels_out

    def __call__(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        shift = 0.05 * (y.to(x.dtype) - 1).reshape(-1, 1, 1, 1) + 1e-4 * t.to(x.dtype).reshape(-1, 1, 1, 1)
        out = 0.5 * x + shift
        return torch.cat([out] + [torch.zeros_like(out)] * (self.c_out - 1), dim=1)


Y = torch.tensor([0, 1, 2, 0])
SHAPE = (4, 1, 3, 3)


def test_parse_interval():
    assert parse_interval(None) is None and parse_interval("0.2,0.8") == (0.2, 0.8) and parse_interval((0, 1)) == (0, 1)
    for bad in ("0.8,0.2", "-0.1,0.5", "0.5,1.5", "0.5", "a,b", "0.1,0.2,0.3"):
        with pytest.raises(UserError, match="interval"):
            parse_interval(bad)


def test_diffusion_noise_level_is_the_flow_t_with_the_same_snr():
    ab = Schedule.named("linear", 1000).alphas_cumprod
    level = diffusion_noise_level(ab)(torch.arange(1000))
    # the flow interpolant's SNR (1−t)²/t² equals diffusion's ᾱ/(1−ᾱ) at that t
    assert torch.allclose(((1 - level) / level) ** 2, ab / (1 - ab), rtol=1e-9)
    assert (level.diff() > 0).all() and 0 < level[0] < 0.011 and 0.99 < level[-1] < 1


@pytest.mark.parametrize("objective,sampler,steps", [("flow", "euler", 10), ("flow", "heun", 8), ("flow", "sde", 9),
                                                     ("diffusion", "ddim", 10), ("diffusion", "dpm++", 10),
                                                     ("diffusion", "heun", 6), ("diffusion", "ddpm", 10)])
def test_nfe_counts_and_bit_identical_unguided_steps(objective, sampler, steps):
    c_out = 2 if sampler == "ddpm" else 1
    kw = dict(objective=objective, sampler=sampler, steps=steps, y=Y, seed=3, learn_sigma=c_out == 2)
    levels = evaluation_levels(objective, sampler, steps)
    lo, hi = float(levels.quantile(0.3)), float(levels.quantile(0.7))
    inside = int(((levels >= lo) & (levels <= hi)).sum())
    assert 0 < inside < len(levels)
    runs = {}
    for name, cfg, interval in [("plain", 1.0, None), ("const", 3.0, None), ("interval", 3.0, (lo, hi)),
                                ("all", 3.0, (0.0, 1.0)), ("none", 3.0, (0.0, 0.0))]:
        m = ToyModel(c_out)
        runs[name] = sample(m, SHAPE, cfg_scale=cfg, guidance_interval=interval, **kw)
        # each guided call evaluates 2N rows, each unguided one N: NFE per sample = rows / N
        assert m.rows / SHAPE[0] == count_nfe(objective, sampler, steps, cfg, interval), name
    assert count_nfe(objective, sampler, steps, 3.0, (lo, hi)) == len(levels) + inside
    assert torch.equal(runs["all"], runs["const"])     # an interval covering everything is constant guidance
    assert torch.equal(runs["none"], runs["plain"])    # outside the interval: exactly the unguided sampler
    assert not torch.equal(runs["interval"], runs["plain"]) and not torch.equal(runs["interval"], runs["const"])


def test_mixed_batch_guides_only_the_samples_inside():
    m = ToyModel()
    net = guided_model(m, 3.0, null_class=3, eps_channels=1, interval=(0.4, 1.0),
                       noise_level=lambda t: t.double() / 999)
    x = torch.randn(SHAPE)
    t = torch.tensor([100.0, 900.0, 500.0, 300.0])
    out = net(x, t, Y)
    full = guided_model(m, 3.0, null_class=3, eps_channels=1)(x, t, Y)
    inside = torch.tensor([False, True, True, False])
    assert torch.equal(out[inside], full[inside]) and torch.equal(out[~inside], m(x, t, Y)[~inside])


def test_diffusion_sample_accepts_the_interval_directly():
    m = ToyModel()
    a = diffusion_sample(m, SHAPE, y=Y, sampler="ddim", steps=5, cfg_scale=2.0, learn_sigma=False, seed=0,
                         guidance_interval="0,0")
    b = diffusion_sample(m, SHAPE, y=Y, sampler="ddim", steps=5, learn_sigma=False, seed=0)
    assert torch.equal(a, b)
