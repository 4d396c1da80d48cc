"""The shipped shapes models: the teacher loads in diffusers; the judges score known cases right."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcmserve.eval.judge import ShapesJudge, scene_key
from lcmserve.eval.metrics import attribute_accuracy, clip_score, frechet_distance
from lcmserve.eval.run import real_images
from lcmserve.shapes.bundle import CLASSIFIER, CLIP, TEACHER, weights_dir
from lcmserve.shapes.scenes import caption_for_index, scene_for_index

pytestmark = pytest.mark.skipif(
    not (weights_dir() / TEACHER).exists(), reason="the shapes weights are not bundled in this checkout"
)
N = 400


@pytest.fixture(scope="module")
def judge():
    return ShapesJudge()


@pytest.fixture(scope="module")
def heldout():
    pairs = [caption_for_index(i, "heldout", 5000) for i in range(N)]
    scenes, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    return scenes, captions, real_images(scenes)


def _size(path):
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_bundle_is_small():
    # The teacher, the domain CLIP and the judge stay under 25 MB together; the LCM comes on top.
    family = sum(_size(weights_dir() / name) for name in (TEACHER, "shapes-clip", "shapes-classifier.safetensors"))
    assert family < 25 * 2**20, family
    if (weights_dir() / "shapes-lcm").exists():
        assert _size(weights_dir() / "shapes-lcm") < 20 * 2**20
    if (weights_dir() / "shapes-lcm-lora").exists():  # a rank-16 adapter: a fraction of the UNet
        assert _size(weights_dir() / "shapes-lcm-lora") < 4 * 2**20
    if (weights_dir() / "shapes-lcm-shifted").exists():  # the style adapter: cross-attention keys and values only
        assert _size(weights_dir() / "shapes-lcm-shifted") < 4 * 2**20
    assert _size(weights_dir()) < 40 * 2**20  # everything the package ships


def test_shipped_teacher_loads_and_samples_in_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(weights_dir() / TEACHER, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim is None  # a plain teacher, not an LCM
    out = pipe("a large red circle in the center on a white background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_classifier_reads_real_renders(judge, heldout):
    scenes, _, images = heldout
    result = attribute_accuracy(judge.read(images), [scene_key(s) for s in scenes])
    assert result["accuracy"] > 0.97, result


def test_shuffled_captions_drop_clip_score_and_accuracy(judge, heldout):
    scenes, captions, images = heldout
    order = list(range(N))
    random.Random(0).shuffle(order)
    img = judge.image_embeds(images)
    right = clip_score(img, judge.text_embeds(captions))
    wrong = clip_score(img, judge.text_embeds([captions[i] for i in order]))
    assert right > wrong + 5, (right, wrong)
    wrong_acc = attribute_accuracy(judge.read(images), [scene_key(scenes[i]) for i in order])["accuracy"]
    assert wrong_acc < 0.1


def test_real_renders_score_near_the_floor(judge, heldout):
    _, _, images = heldout
    other = real_images([scene_for_index(i, "heldout", 6000) for i in range(N)])
    floor = frechet_distance(judge.image_features(images).numpy(), judge.image_features(other).numpy())
    # Degraded renders are measurably farther away: blurred to 8x8 blocks, and with pixel noise.
    reference = judge.image_features(other).numpy()
    blurred = torch.nn.functional.avg_pool2d(images, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for degraded in (blurred, noisy):
        far = frechet_distance(judge.image_features(degraded).numpy(), reference)
        assert far > 2 * floor, (floor, far)


def _read_back(model, guidance, judge, heldout, n=96):
    """The judge's accuracy on 4-step images of the first ``n`` held-out prompts, against their own
    captions and against shuffled ones (what a model that ignored its prompts would score as well)."""
    from lcmserve.engine import LCMSampler, Row

    scenes, captions, _ = heldout
    engine = LCMSampler(model, max_batch_size=32)
    images = torch.cat([engine.run_rows([Row(c, 100 + i + a, guidance) for i, c in enumerate(captions[a : a + 32])],
                                        4, 64, 64).images for a in range(0, n, 32)])
    targets = [scene_key(s) for s in scenes[:n]]
    order = list(range(n))
    random.Random(1).shuffle(order)
    read = judge.read(images)
    return attribute_accuracy(read, targets), attribute_accuracy(read, [targets[i] for i in order])


def test_shipped_lcm_is_the_default_model_and_follows_its_prompts(judge, heldout):
    from lcmserve.models import DEFAULT_MODEL, load_model

    assert DEFAULT_MODEL == "shapes-lcm"
    model = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    assert model.guidance_mode == "embedding" and model.native_size == 64
    right, shuffled = _read_back(model, 8.0, judge, heldout)
    # The evaluation (docs/results/lcm-vs-solvers.md) measured background 1.000 and layout 0.997 at
    # 4 steps; a model that ignored its prompts would score as well against shuffled captions.
    assert right["background"] > 0.9, right
    assert right["layout"] > shuffled["layout"] + 0.15, (right, shuffled)
    assert right["colour"] > shuffled["colour"] + 0.1, (right, shuffled)
    # and it draws most scenes exactly (0.903 at 4 steps on 300 held-out prompts)
    assert right["accuracy"] > 0.75, right


def test_shipped_lcm_lora_turns_the_teacher_into_a_few_step_model(judge, heldout):
    from lcmserve.models import load_model

    model = load_model("shapes-teacher", lora="shapes-lcm-lora", device="cpu", dtype="float32")
    assert model.guidance_mode == "cfg" and model.default_guidance_scale == 1.0
    assert model.describe()["lora"] == "shapes-lcm-lora"
    right, shuffled = _read_back(model, 1.0, judge, heldout)
    assert right["background"] > 0.9, right
    assert right["layout"] > shuffled["layout"] + 0.15, (right, shuffled)
    assert right["colour"] > shuffled["colour"] + 0.1, (right, shuffled)
    # 0.903 at 4 steps on 300 held-out prompts, as the full LCM, where the teacher's own solvers reach
    # 0.49 in 4 steps (docs/results/lcm-vs-solvers.md)
    assert right["accuracy"] > 0.75, right


def test_eval_samples_a_base_model_with_an_lcm_lora(tmp_path):
    from lcmserve.eval.run import EvalConfig, run_eval

    result = run_eval(EvalConfig(model="shapes-teacher", lora="shapes-lcm-lora", steps=[2], num_images=4,
                                 batch_size=4, out=str(tmp_path / "ev"), device="cpu"))
    assert result["config"]["lora"] == "shapes-lcm-lora" and result["config"]["guidance"] == 1.0
    assert [r["sampler"] for r in result["rows"]] == ["real renders", "lcm"]
    assert "+ LoRA `shapes-lcm-lora`, guidance 1.0" in (tmp_path / "ev" / "eval.md").read_text()


def test_eval_names_an_adapter_on_every_row_and_scores_a_style(tmp_path):
    from lcmserve.engine.bench_adapters import make_adapter
    from lcmserve.eval.run import EvalConfig, run_eval
    from lcmserve.eval.sampling import sample
    from lcmserve.models import load_model

    adapter = make_adapter(load_model("shapes-lcm", device="cpu", dtype="float32").unet, tmp_path / "style", 4, 7)
    result = run_eval(EvalConfig(model="shapes-lcm", adapter=str(adapter), style="shifted", steps=[2], num_images=6,
                                 batch_size=6, out=str(tmp_path / "ev"), device="cpu"))
    assert [r["sampler"] for r in result["rows"]] == ["real renders", "lcm"]
    real = result["rows"][0]  # renders in the style: all read as it, and right against what it draws
    assert real["shifted"] == 1.0 and real["accuracy"] == 1.0
    text = (tmp_path / "ev" / "eval.md").read_text()
    assert f"+ adapter `{adapter}` on every row, scored against the shifted style" in text and "| shifted |" in text
    plain = sample("shapes-lcm", "lcm", 2, 8.0, ["a red circle"], [3])
    styled = sample("shapes-lcm", "lcm", 2, 8.0, ["a red circle"], [3], adapter=str(adapter))
    assert (plain - styled).abs().max() > 1e-3


def test_clip_and_classifier_files_exist():
    assert (weights_dir() / CLIP / "config.json").exists()
    assert (weights_dir() / CLASSIFIER).exists()


SHIPPED = ["--clip", "shipped", "--vae", "shipped", "--teacher", "shipped", "--classifier", "shipped"]


def test_bundle_cli_refuses_an_lcm_that_is_not_a_distillation_run(tmp_path, capsys):
    from lcmserve.cli import main

    assert main(["shapes", "bundle", *SHIPPED, "--lcm", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lcm: run folder" in err and "does not exist" in err and "(see --lcm)" in err
    (tmp_path / "empty").mkdir()
    assert main(["shapes", "bundle", *SHIPPED, "--lcm", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a distillation output folder (no unet/)" in err and "(see --lcm)" in err
    assert main(["shapes", "bundle", *SHIPPED, "--lora", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a `distill lora` output folder (no pytorch_lora_weights.safetensors)" in err
    assert "(see --lora)" in err
    assert main(["shapes", "bundle", *SHIPPED, "--shifted", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a `distill lcf --lcf-adapter` output folder" in err and "(see --shifted)" in err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_bundle_ships_an_lcm_lora(tmp_path, capsys):
    from safetensors import safe_open

    from lcmserve.cli import main
    from lcmserve.distill import DistillConfig, distill
    from lcmserve.models import load_model
    from lcmserve.shapes.bundle import LORA, LORA_FILE

    run = tmp_path / "lora"
    distill(DistillConfig(mode="lora", teacher=str(weights_dir() / TEACHER), out=str(run), data="shapes", steps=1,
                          batch_size=2, lora_rank=4, lora_alpha=8, samples=0, checkpoint_every=1, lr=1e-2,
                          ema_decay=0.0))
    out = tmp_path / "weights"
    assert main(["shapes", "bundle", *SHIPPED, "--lora", str(run), "-o", str(out)]) == 0
    capsys.readouterr()
    assert {p.name for p in out.iterdir()} == {TEACHER, CLIP, CLASSIFIER, LORA, "training-configs.json"}
    with safe_open(str(out / LORA / LORA_FILE), "pt") as shipped, safe_open(str(run / LORA_FILE), "pt") as trained:
        assert shipped.metadata() == trained.metadata()  # rank and alpha travel with the weights
        names = trained.keys()  # file handles, not dicts
        assert set(shipped.keys()) == set(names)
        for name in names:
            assert shipped.get_tensor(name).dtype == torch.float16
            torch.testing.assert_close(shipped.get_tensor(name), trained.get_tensor(name).to(torch.float16))
    # the float16 adapter fuses into the teacher as the run's own file does
    fused = {k: load_model(str(weights_dir() / TEACHER), lora=str(path), device="cpu", dtype="float32").unet
             for k, path in (("shipped", out / LORA), ("run", run))}
    base = load_model(str(weights_dir() / TEACHER), lora=str(out / LORA), lora_scale=0.0, device="cpu",
                      dtype="float32").unet
    x, c = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.randn(1, 32, 128)
    with torch.no_grad():
        shipped_eps, run_eps, base_eps = (m(x, 500, c).sample for m in (fused["shipped"], fused["run"], base))
    assert (shipped_eps - run_eps).abs().max() < 0.01 * (run_eps - base_eps).abs().max()
    configs = json.loads((out / "training-configs.json").read_text())
    assert configs["lora"]["mode"] == "lora" and configs["lora"]["lora_alpha"] == 8 and "losses" not in configs["lora"]


def test_bundle_ships_a_distilled_lcm(tmp_path, capsys):
    from safetensors.torch import load_file

    from lcmserve.cli import main
    from lcmserve.distill import DistillConfig, distill
    from lcmserve.models import load_model
    from lcmserve.shapes.bundle import LCM

    run = tmp_path / "lcd"
    distill(DistillConfig(teacher=str(weights_dir() / TEACHER), out=str(run), data="shapes", steps=1, batch_size=2,
                          time_cond_proj_dim=32, samples=0, checkpoint_every=1, lr=1e-4))
    out = tmp_path / "weights"
    assert main(["shapes", "bundle", *SHIPPED, "--lcm", str(run), "-o", str(out)]) == 0
    assert "bundled the shapes models" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {TEACHER, CLIP, CLASSIFIER, LCM, "training-configs.json"}
    assert not [p for p in out.rglob("*.json") if "_name_or_path" in p.read_text()]  # no build paths shipped
    # float16 on disk, the run's weights otherwise
    shipped = load_file(out / LCM / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == trained.keys() and all(v.dtype == torch.float16 for v in shipped.values())
    for name, value in trained.items():
        torch.testing.assert_close(shipped[name], value.to(torch.float16))
    model = load_model(str(out / LCM), device="cpu", dtype="float32")
    assert model.guidance_mode == "embedding" and model.describe()["time_cond_proj_dim"] == 32
    configs = json.loads((out / "training-configs.json").read_text())
    assert configs["lcm"]["mode"] == "lcd" and configs["lcm"]["steps"] == 1 and configs["lcm"]["wall_s"] > 0
    assert "losses" not in configs["lcm"]
    # a new output folder still records the recipes of the stages taken from the shipped weights
    recorded = json.loads((weights_dir() / "training-configs.json").read_text())
    assert set(configs) == (set(recorded) - {"lora", "shifted"}) | {"lcm"}  # no adapters here, so no their recipes
    assert all(configs[stage] == recorded[stage] for stage in ("clip", "vae", "teacher", "classifier"))


def test_a_teacher_continued_from_the_shipped_one_keeps_its_starting_recipe(tmp_path):
    import shutil
    from dataclasses import asdict

    from lcmserve.shapes.bundle import bundle
    from lcmserve.shapes.train import StageConfig

    run = tmp_path / "teacher"
    shutil.copytree(weights_dir() / TEACHER / "unet", run / "unet")  # stands in for the trained UNet
    cfg = StageConfig("teacher", str(run), steps=7, clip_dir="shipped", vae_dir="shipped", init_unet="shipped")
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    out = bundle("shipped", "shipped", run, "shipped", tmp_path / "weights")
    configs = json.loads((out / "training-configs.json").read_text())
    recorded = json.loads((weights_dir() / "training-configs.json").read_text())
    assert configs["teacher"]["steps"] == 7 and configs["teacher"]["init_unet_recipe"] == recorded["teacher"]
    assert configs["clip"] == recorded["clip"] and "lcm" not in configs

    # continued again from that bundle (not the shipped weights): the chain goes on
    run2 = tmp_path / "teacher-2"
    shutil.copytree(run / "unet", run2 / "unet")
    cfg2 = StageConfig("teacher", str(run2), steps=5, clip_dir="shipped", vae_dir="shipped",
                       init_unet=str(out / TEACHER))
    (run2 / "config.json").write_text(json.dumps(asdict(cfg2)))
    out2 = bundle("shipped", "shipped", run2, "shipped", tmp_path / "weights-2")
    chained = json.loads((out2 / "training-configs.json").read_text())["teacher"]
    assert chained["steps"] == 5 and chained["init_unet_recipe"] == configs["teacher"]
    assert chained["init_unet_recipe"]["init_unet_recipe"] == recorded["teacher"]

    # continued from a run folder that was never bundled: its config joins the chain, which goes on from there
    run3 = tmp_path / "teacher-3"
    shutil.copytree(run / "unet", run3 / "unet")
    cfg3 = StageConfig("teacher", str(run3), steps=3, clip_dir="shipped", vae_dir="shipped", init_unet=str(run2))
    (run3 / "config.json").write_text(json.dumps(asdict(cfg3)))
    third = json.loads((bundle("shipped", "shipped", run3, "shipped", tmp_path / "weights-3")
                        / "training-configs.json").read_text())["teacher"]
    assert third["steps"] == 3 and third["init_unet_recipe"]["steps"] == 5
    assert third["init_unet_recipe"]["init_unet_recipe"] == configs["teacher"]


def test_the_shapes_plug_in_registers_its_models_and_data_source():
    from lcmserve.distill.data import MapSource, StreamSource, open_source
    from lcmserve.models.registry import bundled_names, data_source_names, resolve_bundled, served_adapters

    assert set(bundled_names("model")) == {"shapes-lcm", "shapes-teacher"}
    assert bundled_names("lora") == ("shapes-lcm-lora", "shapes-lcm-shifted")
    assert {"shapes", "shapes-shifted"} <= set(data_source_names())
    assert served_adapters("shapes-lcm") == {"shifted": "shapes-lcm-shifted"}
    assert served_adapters("shapes-teacher") == {}
    assert Path(resolve_bundled("shapes-lcm")) == weights_dir() / "shapes-lcm"
    assert isinstance(open_source("shapes", 0, 0), StreamSource)
    assert isinstance(open_source("shapes", 0, 3), MapSource) and len(open_source("shapes", 0, 3)) == 3


def test_the_bundled_names_resolve_without_importing_the_domain():
    """A fresh interpreter that imports only lcmserve.models finds shapes-lcm: the entry point registers it."""
    code = ("import sys; from lcmserve.models.registry import resolve_bundled; "
            "print(resolve_bundled('shapes-lcm')); print('lcmserve.shapes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]) == weights_dir() / "shapes-lcm" and out[1] == "True"
