"""The teacher's loss weighting and the training-speed probe that picks GPU training flags."""

import json
from types import SimpleNamespace

import pytest
import torch

import lcmserve.shapes.train as T
from lcmserve.cli import main
from lcmserve.errors import InvalidInputError
from lcmserve.shapes.speed import SpeedRow, parse_variants, teacher_step_speed


def _scheduler():
    from diffusers import DDPMScheduler

    from lcmserve.shapes import models as M

    return DDPMScheduler.from_config(M.scheduler_config())


def test_min_snr_weighting_matches_the_formula():
    sched = _scheduler()
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 50, 400, 999])

    def zero_unet(x, t, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(x))

    def text(ids):
        return (torch.zeros(ids.shape[0], 3, 8),)

    ids = torch.zeros(4, 3, dtype=torch.long)
    plain = T.teacher_loss(zero_unet, text, sched, latents, ids, noise, t)
    torch.testing.assert_close(plain, noise.pow(2).mean())
    # By hand: SNR = abar / (1 - abar); weight min(SNR, 5) / SNR; the loss of row i is mean(noise_i^2)
    abar = sched.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    expected = (noise.pow(2).mean(dim=(1, 2, 3)).double() * weight).mean().float()
    got = T.teacher_loss(zero_unet, text, sched, latents, ids, noise, t, snr_gamma=5.0)
    torch.testing.assert_close(got, expected)
    assert weight[0] < 0.01 and weight[-1] == 1  # the easy low-noise step counts far less


def test_bad_snr_gamma():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="snr_gamma must be a finite number >= 0") as err:
            T.StageConfig("classifier", "x", snr_gamma=bad)
        assert err.value.param == "snr_gamma"


def test_speed_probe_times_the_real_step_on_cpu():
    row = teacher_step_speed("fp32", 2, torch.device("cpu"), seconds=0.05, warm_steps=1, train_text_encoder=True,
                             snr_gamma=5.0)
    assert row.steps >= 3 and row.samples_per_s > 0 and row.first_steps_s > 0 and row.peak_mb is None
    assert row.flags() == "--batch-size 2"


def test_the_choice_charges_the_warm_up_against_the_budget():
    eager = SpeedRow("bf16", 512, 10, first_steps_s=2.0, samples_per_s=10_000, peak_mb=1.0)
    compiled = SpeedRow("bf16+compile", 512, 10, first_steps_s=60.0, samples_per_s=20_000, peak_mb=1.0)
    assert eager.samples_in(100) > compiled.samples_in(100)  # 980k against 800k
    assert compiled.samples_in(600) > eager.samples_in(600)
    assert compiled.flags() == "--batch-size 512 --bf16 --compile"
    assert compiled.samples_in(30) == 0


def test_bad_variants_and_cli_input(tmp_path, capsys):
    with pytest.raises(InvalidInputError, match="variants must be a comma list of fp32, bf16") as err:
        parse_variants("fp16")
    assert err.value.param == "variants"
    assert main(["shapes", "train-speed", "--variants", "fp16", "--device", "cpu"]) == 2
    assert "variants must be" in capsys.readouterr().err
    assert main(["shapes", "train-speed", "--batch-sizes", "0", "--device", "cpu"]) == 2
    assert "batch_sizes must be" in capsys.readouterr().err
    assert main(["shapes", "train-speed", "--seconds", "-1", "--device", "cpu"]) == 2
    assert "seconds must be" in capsys.readouterr().err
    assert main(["shapes", "train-speed", "--snr-gamma", "-1", "--device", "cpu"]) == 2
    assert "snr_gamma must be a finite number >= 0" in capsys.readouterr().err


def test_cli_prints_the_table_and_the_best_flags(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["shapes", "train-speed", "--device", "cpu", "--batch-sizes", "1,2", "--variants", "fp32",
                 "--seconds", "0.05", "--budget", "60", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fp32 | 1 |" in text and "| fp32 | 2 |" in text
    record = json.loads(out.read_text())
    assert len(record["rows"]) == 2 and record["best"] in text and record["best"].startswith("--batch-size ")


def test_measure_compiles_once_at_the_best_eager_batch_and_survives_failures(monkeypatch):
    import lcmserve.shapes.speed as S

    speed = {("fp32", 2): 100, ("fp32", 4): 150, ("bf16", 2): 300, ("bf16", 4): 250, ("bf16+compile", 2): 600}
    calls = []

    def fake(variant, batch_size, device, seconds, **kwargs):
        calls.append((variant, batch_size))
        if (variant, batch_size) not in speed:
            raise RuntimeError("compile failed")
        return SpeedRow(variant, batch_size, 5, 1.0, speed[variant, batch_size], None)

    monkeypatch.setattr(S, "teacher_step_speed", fake)
    logged = []
    rows = S.measure(["fp32", "bf16", "bf16+compile", "fp32+compile"], [2, 4], torch.device("cpu"), log=logged.append)
    # eager at every batch size; each compiled variant once, at its precision's fastest batch size
    assert calls == [("fp32", 2), ("fp32", 4), ("bf16", 2), ("bf16", 4), ("bf16+compile", 2), ("fp32+compile", 4)]
    assert [(r.variant, r.batch_size) for r in rows] == calls[:5]
    assert any("fp32+compile at batch 4 failed: RuntimeError: compile failed" in line for line in logged)
