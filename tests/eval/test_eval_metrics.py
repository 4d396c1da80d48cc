"""The evaluation metrics on known cases."""

import numpy as np
import pytest
import torch

from lcmserve.eval.metrics import attribute_accuracy, clip_score, frechet_distance


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4))
    assert frechet_distance(a, b) < 0.02  # same distribution
    # Shift the mean by 2 in one coordinate: distance ~4.
    assert frechet_distance(a, b + np.array([2.0, 0, 0, 0])) == pytest.approx(4.0, abs=0.1)
    # Scale one coordinate's std to 3: (3 - 1)^2 = 4.
    assert frechet_distance(a, b * np.array([3.0, 1, 1, 1])) == pytest.approx(4.0, abs=0.2)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a[:, :2], b)


def test_clip_score():
    x = torch.randn(5, 8)
    assert clip_score(x, x) == pytest.approx(100.0)
    assert clip_score(x, -x) == 0.0


def test_attribute_accuracy():
    target = [("white", {"top": ("circle", "red", "small")}),
              ("black", {"left": ("square", "blue", "large"), "center": ("diamond", "green", "small")})]
    assert attribute_accuracy(target, target)["accuracy"] == 1.0
    wrong_colour = [("white", {"top": ("circle", "green", "small")}), target[1]]
    r = attribute_accuracy(wrong_colour, target)
    assert r["accuracy"] == 0.5 and r["colour"] == pytest.approx(2 / 3) and r["shape"] == 1.0
    extra = [("white", {"top": ("circle", "red", "small"), "right": ("circle", "red", "small")}), target[1]]
    r = attribute_accuracy(extra, target)
    assert r["accuracy"] == 0.5 and r["layout"] == 0.5 and r["shape"] == 1.0


def test_eval_config_checks_the_device(monkeypatch, tmp_path, capsys):
    from lcmserve.cli import main
    from lcmserve.errors import InvalidInputError
    from lcmserve.eval.run import EvalConfig

    with pytest.raises(InvalidInputError, match="device must be auto, cpu, cuda or cuda:N") as err:
        EvalConfig(model="shapes-lcm", device="tpu")
    assert err.value.param == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="torch sees no CUDA GPU") as err:
        EvalConfig(model="shapes-lcm", device="cuda:0")
    assert err.value.param == "device"
    assert EvalConfig(model="shapes-lcm", device="cpu").device == "cpu"
    # the command line refuses it before any model loads, and names the flag
    assert main(["eval", "shapes-lcm", "--device", "tpu", "-o", str(tmp_path / "ev")]) == 2
    assert "(see --device)" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_eval_config_with_a_lora_defaults_to_no_guidance_and_the_lcm_sampler_only():
    from lcmserve.errors import InvalidInputError
    from lcmserve.eval.run import EvalConfig

    assert EvalConfig(model="shapes-lcm").guidance == 8.0
    assert EvalConfig(model="shapes-teacher", lora="shapes-lcm-lora").guidance == 1.0
    assert EvalConfig(model="shapes-teacher", lora="shapes-lcm-lora", guidance=1.5).guidance == 1.5
    with pytest.raises(InvalidInputError, match="lcm alone with a LoRA") as err:
        EvalConfig(model="shapes-teacher", lora="shapes-lcm-lora", samplers=["lcm", "ddim"])
    assert err.value.param == "sampler"


def test_eval_refuses_judges_it_cannot_load_before_sampling(tmp_path, capsys):
    """--clip and --classifier name the judges; a folder without a CLIP model or a missing file fails at once,
    naming the flag, while a `shapes train clip` run folder (model/ + tokenizer/) is accepted."""
    from lcmserve.cli import main
    from lcmserve.errors import InvalidInputError
    from lcmserve.eval.run import EvalConfig
    from lcmserve.shapes.bundle import CLIP, bundled

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    assert EvalConfig(model="shapes-lcm", clip_dir=str(tmp_path / "run")).clip_dir == str(tmp_path / "run")
    assert EvalConfig(model="shapes-lcm", clip_dir=str(bundled(CLIP))).clip_dir
    with pytest.raises(InvalidInputError, match="clip: .* holds no CLIP model") as err:
        EvalConfig(model="shapes-lcm", clip_dir=str(tmp_path))
    assert err.value.param == "clip"
    with pytest.raises(InvalidInputError, match="classifier: .* is not a file") as err:
        EvalConfig(model="shapes-lcm", classifier=str(tmp_path / "none.safetensors"))
    assert err.value.param == "classifier"
    assert main(["eval", "shapes-lcm", "--clip", str(tmp_path), "-o", str(tmp_path / "ev")]) == 2
    assert "(see --clip)" in capsys.readouterr().err
