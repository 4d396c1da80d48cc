"""The command line: generate writes images and a record; bad flags get clear errors."""

import json

import pytest
from PIL import Image

from lcmserve.cli import main


def test_generate_writes_images_and_record(tmp_path, lcm_sd_dir, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "--model", str(lcm_sd_dir), "--steps", "2", "--guidance", "5",
                 "--seed", "7", "-n", "3", "--batch-size", "2", "-o", str(out), "-q"])
    assert code == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["seeds"] == [7, 8, 9]
    assert record["request"]["steps"] == 2 and record["request"]["guidance_scale"] == 5.0
    assert record["model"]["family"] == "sd"
    for name in record["files"]:
        assert Image.open(out / name).size == (64, 64)
    assert "wrote 3 image(s)" in capsys.readouterr().out


def test_generate_with_a_lora_takes_a_negative_prompt(tmp_path, base_sd_dir, lora_sd_dir):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(base_sd_dir), "--lora", str(lora_sd_dir), "--steps", "2",
                 "--guidance", "2", "--negative-prompt", "a dog", "--seed", "3", "-o", str(out), "-q"]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["request"]["negative_prompt"] == "a dog" and record["model"]["guidance_mode"] == "cfg"


def test_generate_is_reproducible(tmp_path, lcm_sd_dir):
    for run in ("a", "b"):
        assert main(["generate", "a cat", "--model", str(lcm_sd_dir), "--seed", "1", "-o", str(tmp_path / run),
                     "-q", "--format", "webp"]) == 0
    a = Image.open(tmp_path / "a" / "000-seed1.webp").tobytes()
    assert a == Image.open(tmp_path / "b" / "000-seed1.webp").tobytes()


def test_generate_builds_only_the_batch_sizes_it_runs(tmp_path, lcm_sd_dir, monkeypatch):
    """A compiled backend compiles every bucket at start-up: generate asks for the batches it will run, no more."""
    from lcmserve.engine import backends
    from lcmserve.engine.backends import TorchBackend

    asked = []

    def create_backend(name, model, buckets, **kwargs):
        asked.append(buckets)
        return TorchBackend(model)

    monkeypatch.setattr(backends, "create_backend", create_backend)
    for images, batch, sizes in ((1, 8, (1,)), (3, 8, (3,)), (8, 4, (4,)), (10, 4, (2, 4))):
        assert main(["generate", "a cat", "--model", str(lcm_sd_dir), "--steps", "2", "-n", str(images),
                     "--batch-size", str(batch), "--backend", "compiled", "-o", str(tmp_path / f"{images}-{batch}"),
                     "-q"]) == 0
        assert asked[-1].batch_sizes == sizes and asked[-1].steps == (2,)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--steps", "0"], "steps must be an integer in [1, 8]; got 0 (see --steps)"),
        (["--steps", "9"], "steps must be an integer in [1, 8]; got 9"),
        (["--guidance", "-1"], "guidance_scale must be a finite number in [0, 50.0]; got -1.0 (see --guidance-scale)"),
        (["--guidance", "nan"], "got nan"),
        (["-n", "0"], "num_images must be an integer in [1, 64]; got 0 (see --num-images)"),
        (["--width", "100"], "width must be a multiple of 8 in [16, 128] for this model; got 100 (see --width)"),
        (["--height", "1024"], "height must be a multiple of 8 in [16, 128]"),
        (["--seed", "-3"], "seed must be null or an integer"),
        (["--model", "/does/not/exist"], "model: folder '/does/not/exist' does not exist (see --model)"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on CPU"),
        (["--negative-prompt", "a dog"], "negative_prompt: this model takes guidance as an embedding"),
        (["--compile-mode", "reduce-overhead"],
         "compile_mode must be one of max-autotune-no-cudagraphs, default (reduce-overhead and max-autotune"),
    ],
)
def test_generate_bad_flags(tmp_path, flags, message, capsys):
    code = main(["generate", "a cat", "-o", str(tmp_path / "o"), "-q", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a rejected run


def test_argparse_type_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--steps", "four"])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_info_json(lcm_sdxl_dir, capsys):
    assert main(["info", str(lcm_sdxl_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["guidance_mode"] == "embedding"
    assert set(info["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}


def test_info_of_a_non_lcm_explains_the_fix(base_sd_dir, capsys):
    assert main(["info", str(base_sd_dir)]) == 2
    assert "not an LCM" in capsys.readouterr().err


def test_help_lists_every_command_under_its_group(capsys):
    from lcmserve.cli import GROUPS, build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"generate", "info", "export", "bench", "serve", "loadtest", "loadtest-lora", "distill",
                             "shapes", "eval", "eval-compare"}
    for name in commands:
        assert f"\n    {name} " in out, name
    positions = [out.index(f"\n  {title}\n") for title, _ in GROUPS]
    assert positions == sorted(positions)
    assert out.index("\n    generate ") < out.index("\n  serve it\n") < out.index("\n    serve ")


def test_backend_choices_are_the_engines_list(capsys):
    from lcmserve.engine.backends import BACKENDS

    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--backend", "no-such-backend"])
    err = capsys.readouterr().err
    assert all(name in err for name in BACKENDS)


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lcmserve.cli", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("lcmserve ")
