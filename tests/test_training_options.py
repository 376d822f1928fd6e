"""--loss-weighting and --t-sampling (issue 21): closed forms, moments, bad input, and "off" is
the paper's step bit for bit."""
import math

import numpy as np
import pytest
import torch

from dits.errors import UserError
from dits.objectives import create_objective
from dits.training_options import parse_loss_weighting, parse_t_sampling


def test_min_snr_weights_against_the_closed_form_per_t():
    obj = create_objective("diffusion", loss_weighting="min-snr")
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)          # DiT's linear schedule, written out
    abar = np.cumprod(1.0 - betas)
    t = torch.tensor([0, 10, 100, 200, 400, 700, 999])
    w = obj.weighting.diffusion(obj.diffusion.alphas_cumprod, t)
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    want = np.minimum(snr, 5.0) / snr
    assert np.allclose(w.numpy(), want, rtol=1e-6)
    assert w[0] < 1e-3 and w[-1] == pytest.approx(1.0)                # low noise damped, high noise kept
    g = parse_loss_weighting("min-snr:2.5")
    assert g.gamma == 2.5


def test_min_snr_weighted_loss_is_w_times_mse_plus_untouched_vb():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)

    x0 = torch.randn(6, 1, 4, 4)
    t = torch.tensor([1, 50, 200, 500, 800, 999])
    noise = torch.randn_like(x0)
    plain = create_objective("diffusion").training_losses(Net(), x0, t, noise=noise)
    weighted = create_objective("diffusion", loss_weighting="min-snr:5").training_losses(Net(), x0, t, noise=noise)
    abar = torch.as_tensor(create_objective("diffusion").diffusion.alphas_cumprod)[t]
    snr = abar / (1 - abar)
    w = (torch.clamp(snr, max=5) / snr).float()
    assert torch.equal(weighted["mse"], plain["mse"]) and torch.equal(weighted["vb"], plain["vb"])
    assert torch.allclose(weighted["loss"], w * plain["mse"] + plain["vb"])


def test_flow_min_snr_equals_the_x0_weighting():
    # velocity error = x0 error / t: weighting ||v-err||^2 by min(SNR, g) t^2 weights ||x0-err||^2 by min(SNR, g)
    w = parse_loss_weighting("min-snr:5").flow(torch.tensor([0.1, 0.5, 0.9]))
    t = np.array([0.1, 0.5, 0.9])
    snr = ((1 - t) / t) ** 2
    assert np.allclose(w.numpy(), np.minimum(snr, 5) * t ** 2)


def test_logit_normal_density_moments():
    ts = parse_t_sampling("logit-normal:0.5,0.8")
    t = ts.draw(200_000, torch.Generator().manual_seed(0)).double()
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01
    # the median of a logit-normal is sigmoid(m)
    assert abs(t.median() - 1 / (1 + math.exp(-0.5))) < 0.005
    obj = create_objective("flow", t_sampling="logit-normal")
    assert obj.draw_t(4, torch.Generator().manual_seed(1)).shape == (4,)


def test_off_is_the_papers_step_bit_for_bit():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(create_objective("flow").draw_t(8, g1), create_objective("flow", t_sampling="uniform").draw_t(8, g2))

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.cat([x, x], dim=1)

    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([3, 300, 900])
    a = create_objective("diffusion").training_losses(Net(), x0, t, noise=noise)
    b = create_objective("diffusion", loss_weighting="uniform").training_losses(Net(), x0, t, noise=noise)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv,needle", [
    (["--loss-weighting", "min-snr:0"], "gamma must be"),
    (["--loss-weighting", "min-snr:-1"], "gamma must be"),
    (["--loss-weighting", "snr"], "uniform or min-snr"),
    (["--objective", "diffusion", "--t-sampling", "logit-normal"], "for --objective flow"),
    (["--objective", "flow", "--t-sampling", "logit-normal:0,0"], "S > 0"),
])
def test_bad_options_one_line_exit_2_nothing_created(tmp_path, capsys, argv, needle):
    from dits.cli import main

    out = tmp_path / "run"
    assert main(["train", *argv, "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not out.exists()
