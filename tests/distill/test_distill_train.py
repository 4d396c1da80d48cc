"""The distillation loop: kill-and-resume, two-process DDP (gloo), data sources and the latent cache."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile

import pytest
import torch
import torch.multiprocessing as mp

from lcmserve.distill import DistillConfig, distill
from lcmserve.distill.data import FolderSource, TarShardSource, TrainData, build_or_load_cache, open_source
from lcmserve.distill.teacher import inspect_teacher, load_teacher
from lcmserve.errors import InvalidInputError


def small(out, teacher, **overrides) -> DistillConfig:
    base = dict(teacher=str(teacher), out=str(out), data="shapes", steps=4, batch_size=2, resolution=16,
                time_cond_proj_dim=32, samples=0, checkpoint_every=2, lr=1e-4)
    return DistillConfig(**{**base, **overrides})


class Killed(Exception):
    pass


def _unet_state(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_kill_and_resume_continues_at_the_right_step_with_the_same_data(tmp_path, base_sd_dir):
    cfg = small(tmp_path / "killed", base_sd_dir)

    def kill_after_3(step: int, loss: float) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        distill(cfg, on_step=kill_after_3)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000002.pt"]
    resumed = distill(cfg)
    assert resumed.start_step == 2 and len(resumed.losses) == 4

    whole = distill(small(tmp_path / "whole", base_sd_dir))
    assert whole.start_step == 0
    # same data and draws at every step: the losses match step for step, and so do the final weights
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-7)
    a, b = _unet_state(tmp_path / "killed"), _unet_state(tmp_path / "whole")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)

    # a finished run does nothing more, and a changed option is refused rather than mixed in
    assert distill(cfg).start_step == 4
    with pytest.raises(InvalidInputError, match="other options") as err:
        distill(small(tmp_path / "killed", base_sd_dir, lr=2e-4))
    assert err.value.param == "out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result = distill(DistillConfig(**cfg_dict))
    state = {k: v.detach().cpu() for k, v in result.unet.state_dict().items()}
    torch.save({"state": state, "losses": result.losses}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_processes_keep_identical_weights(tmp_path, base_sd_dir):
    cfg = small(tmp_path / "ddp", base_sd_dir, steps=2, checkpoint_every=100)
    mp.spawn(_rank_main, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, value in r0["state"].items():
        torch.testing.assert_close(value, r1["state"][name], rtol=0, atol=0)
    # the ranks trained on different data (their slices of the global batch), yet agree, and did move
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(base_sd_dir, subfolder="unet").state_dict()
    assert max((r0["state"][k] - v).abs().max().item() for k, v in start.items()) > 0
    summary = json.loads((tmp_path / "ddp" / "distill.json").read_text())
    assert summary["processes"] == 2 and (tmp_path / "ddp" / "model_index.json").is_file()


def test_ranks_read_disjoint_slices_in_a_seeded_order(base_sd_dir):
    class Fake:
        def __len__(self):
            return 10

    per_rank = [TrainData(Fake(), None, seed=3, batch_size=2, resolution=32, rank=r, world=2) for r in (0, 1)]
    steps = [set(d.indices(s)) for s in range(2) for d in per_rank]  # epoch 0: 4 batches of 2 out of 10
    assert all(not (a & b) for i, a in enumerate(steps) for b in steps[i + 1:])
    again = TrainData(Fake(), None, seed=3, batch_size=2, resolution=32, rank=1, world=2)
    assert again.indices(7) == per_rank[1].indices(7)  # a pure function of (seed, step, rank)
    other = TrainData(Fake(), None, seed=4, batch_size=2, resolution=32, rank=1, world=2)
    assert [other.indices(s) for s in range(5)] != [per_rank[1].indices(s) for s in range(5)]


def _png(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_and_jsonl_folders(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{s}{i:03d}"
                _add(tar, f"{key}.png", _png((80 * i, 40 * s, 200)))
                if i == 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"json caption {key}"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"caption {key}".encode())
    source = open_source(str(shards), 0, 0)
    assert isinstance(source, TarShardSource) and len(source) == 6
    image, text = source.load(5, 32)
    assert image.shape == (3, 32, 32) and text == "json caption 1002"
    assert -1 <= float(image.min()) and float(image.max()) <= 1
    assert len(open_source(str(shards / "*.tar"), 0, 0)) == 6
    with tarfile.open(shards / "00002.tar", "w") as tar:
        _add(tar, "lonely.png", _png((0, 0, 0)))
    with pytest.raises(InvalidInputError, match="no caption"):
        open_source(str(shards), 0, 0)

    folder = tmp_path / "listed"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((255, 0, 0)))
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "red"}) + "\n")
    assert isinstance(open_source(str(folder), 0, 0), FolderSource)
    (folder / "captions.jsonl").write_text(json.dumps({"file": "b.png", "caption": "blue"}) + "\n")
    with pytest.raises(InvalidInputError, match="do not exist"):
        open_source(str(folder), 0, 0)


def test_cache_encodes_once_and_gives_the_batches_of_the_uncached_path(tmp_path, base_sd_dir, monkeypatch):
    import lcmserve.distill.data as data_module

    teacher = load_teacher(inspect_teacher(str(base_sd_dir), "lcd"), torch.device("cpu"))
    source = open_source("shapes", 0, 6)
    cache = build_or_load_cache(str(tmp_path / "c.pt"), source, teacher, 32, is_main=True)
    assert cache.mean.shape == (6, 4, 16, 16) and len(cache.captions) == 6
    plain = TrainData(source, teacher, seed=1, batch_size=4, resolution=32)
    cached = TrainData(source, teacher, seed=1, batch_size=4, resolution=32, cache=cache)
    for step in (0, 1):  # the second step wraps into the next epoch
        a, b = plain.batch(step, torch.device("cpu")), cached.batch(step, torch.device("cpu"))
        assert a.captions == b.captions
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.text.hidden, b.text.hidden, rtol=1e-4, atol=1e-5)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(data_module, "encode_images", no_encoding)
    again = build_or_load_cache(str(tmp_path / "c.pt"), source, teacher, 32, is_main=True)
    torch.testing.assert_close(again.mean, cache.mean)
    with pytest.raises(AssertionError, match="rebuilt"):  # other resolution: another key, so it re-encodes
        build_or_load_cache(str(tmp_path / "c.pt"), source, teacher, 16, is_main=True)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_max_minutes_must_be_a_finite_number_not_below_zero(tmp_path, bad):
    with pytest.raises(InvalidInputError, match="max_minutes must be a finite number >= 0") as err:
        DistillConfig(teacher="t", out=str(tmp_path), max_minutes=bad)
    assert err.value.param == "max_minutes"


def test_max_minutes_stops_early_with_a_checkpoint_and_a_loadable_model(tmp_path, base_sd_dir, monkeypatch):
    import lcmserve.distill.train as train_module
    from lcmserve.models import load_model

    # All of the budget is kept back for the finish: the deadline has passed by the end of the first step.
    monkeypatch.setattr(train_module, "FINISH_RESERVE_S", 1e9)
    cfg = small(tmp_path / "cut", base_sd_dir, max_minutes=0.5)
    seen = []
    result = distill(cfg, on_step=lambda step, loss: seen.append(step))
    assert seen == [1] and result.steps == 1 and len(result.losses) == 1
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-0000001.pt"]
    summary = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert summary["steps"] == 1 < summary["steps_asked"] == 4 and len(summary["losses"]) == 1
    model = load_model(str(tmp_path / "cut"), device="cpu", dtype="float32")
    assert model.guidance_mode == "embedding" and model.describe()["time_cond_proj_dim"] == 32

    # Without the budget the same run goes on from the checkpoint to the steps it was asked for.
    monkeypatch.setattr(train_module, "FINISH_RESERVE_S", 0.0)
    resumed = distill(small(tmp_path / "cut", base_sd_dir))
    assert resumed.start_step == 1 and resumed.steps == 4 and len(resumed.losses) == 4
    summary = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert summary["steps"] == summary["steps_asked"] == 4 and summary["resumed_from"] == 1


def test_the_bundled_teacher_is_taken_by_name():
    """--teacher shapes-teacher finds the shipped folder, as --model shapes-lcm does; a missing one says so."""
    from lcmserve.errors import ModelLoadError
    from lcmserve.shapes.bundle import bundled

    info = inspect_teacher("shapes-teacher", "lora")
    assert info.folder == bundled("shapes-teacher") and not info.is_lcm
    with pytest.raises(ModelLoadError, match="shapes-teacher for the bundled one") as err:
        inspect_teacher("/no/such/teacher", "lcd")
    assert err.value.param == "teacher"
