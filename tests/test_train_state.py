"""state.py: resume is bit-exact, saves are atomic, GPU/precision checks say what to do, EMA is the formula."""

import random

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from minidiff.train import state
from minidiff.errors import TrainingError


# ----------------------------------------------------------------------------------------------- resume is bit-exact
class RunningMean(nn.Module):
    """A module with a buffer that changes in training (like BatchNorm's running mean, without its CPU cost)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))

    def forward(self, x):
        if self.training:
            self.running_mean.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)
        return x - self.running_mean


def _make(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), RunningMean(16), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))  # warmup: lr changes per step
    return model, opt, sched, state.EMA(model, decay=0.9)


def _train(model, opt, sched, ema, steps):
    """Every RNG the scripts use is drawn from: torch (data, dropout), numpy (targets), python (an offset)."""
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4)
        y = torch.from_numpy(np.random.randn(8, 1)).float() + random.random()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)


def _state(model, opt, sched, ema):
    return (
        [t.clone() for t in model.state_dict().values()]
        + [t.clone() for t in ema.state_dict().values()]
        + [v.clone() for s in opt.state_dict()["state"].values() for v in s.values()]
        + [
            torch.tensor(sched.get_last_lr()),
            torch.randn(3),
            torch.tensor(np.random.rand()),
            torch.tensor(random.random()),
        ]
    )


def _resumed(tmp_path, restore_rng=True):
    model, opt, sched, ema = _make(123)
    state.seed_all(0)
    _train(model, opt, sched, ema, 5)
    state.save_checkpoint(
        tmp_path, 5, {"model": model, "ema": ema}, {"adam": opt}, {"warmup": sched}, extra={"epoch": 2}
    )
    model, opt, sched, ema = _make(7)  # fresh objects, different weights and RNG state
    state.seed_all(999)
    step, extra = state.load_checkpoint(
        tmp_path, {"model": model, "ema": ema}, {"adam": opt}, {"warmup": sched}, restore_rng=restore_rng
    )
    assert (step, extra) == (5, {"epoch": 2})
    _train(model, opt, sched, ema, 5)
    return _state(model, opt, sched, ema)


def test_checkpoint_resume_is_bitwise_identical(tmp_path):
    model, opt, sched, ema = _make(123)
    state.seed_all(0)
    _train(model, opt, sched, ema, 10)
    straight = _state(model, opt, sched, ema)
    resumed = _resumed(tmp_path)
    assert len(straight) == len(resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    # the test can fail: without the saved RNG states the continuation differs
    other = _resumed(tmp_path / "norng", restore_rng=False)
    assert not all(torch.equal(a, b) for a, b in zip(straight, other))


def test_checkpoint_file_layout_is_plain_safetensors(tmp_path):
    model, opt, sched, ema = _make(0)
    _train(model, opt, sched, ema, 1)
    path = state.save_checkpoint(tmp_path, 1, {"model": model}, {"adam": opt}, {"warmup": sched})
    assert path == tmp_path / "checkpoints" / "step-000001.safetensors"
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == path.name
    t = safetensors.torch.load_file(path)  # no pickle anywhere: a plain safetensors file
    assert torch.equal(t["module.model.0.weight"], model[0].weight)
    assert torch.equal(t["module.model.3.running_mean"], model[3].running_mean)
    assert torch.equal(t["optim.adam.state.0.exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert t["optim.adam.state.0.step"].shape == () and t["optim.adam.state.0.step"].item() == 1
    assert t["rng.torch"].dtype == torch.uint8 and t["rng.numpy.1"].shape == (624,)


def test_latest_keep_last_and_bad_input(tmp_path):
    model, opt, _, _ = _make(0)
    for step in (10, 20, 30):
        model[0].bias.data.fill_(step)
        state.save_checkpoint(tmp_path, step, {"m": model}, {"o": opt}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")) == [
        "step-000020.safetensors",
        "step-000030.safetensors",
    ]
    last = tmp_path / "checkpoints" / "step-000030.safetensors"
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "latest", last):
        assert state.load_checkpoint(where, {"m": model}, {"o": opt})[0] == 30
    assert state.load_checkpoint("latest", {"m": model}, out_dir=tmp_path)[0] == 30
    assert state.load_checkpoint(tmp_path / "checkpoints" / "step-000020.safetensors", {"m": model})[0] == 20
    assert (model[0].bias == 20).all()

    (tmp_path / "e").mkdir()
    with pytest.raises(TrainingError, match="nothing to resume from"):
        state.load_checkpoint(tmp_path / "e", {"m": model})
    with pytest.raises(TrainingError, match="not found"):
        state.load_checkpoint(tmp_path / "nope.safetensors", {"m": model})
    with pytest.raises(TrainingError, match="does not match module .m.: 0 keys missing.*unexpected"):
        state.load_checkpoint(tmp_path, {"m": nn.Sequential(nn.Linear(4, 16))})
    with pytest.raises(TrainingError, match="no module 'ema'"):
        state.load_checkpoint(tmp_path, {"ema": model})
    with pytest.raises(TrainingError, match="does not fit module"):
        bigger = nn.Sequential(nn.Linear(4, 32), nn.Dropout(), nn.ReLU(), RunningMean(32), nn.Linear(32, 1))
        state.load_checkpoint(tmp_path, {"m": bigger})
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(TrainingError, match="not a minidiff training checkpoint"):
        state.load_checkpoint(tmp_path / "foreign.safetensors", {"m": model})
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        state.load_checkpoint(tmp_path / "junk.safetensors", {"m": model})


def test_trainable_saves_only_trainable_params(tmp_path):
    model, opt, _, _ = _make(0)
    model[0].requires_grad_(False)  # frozen "base model"
    state.save_checkpoint(tmp_path, 1, {"lora": state.Trainable(model)}, {})
    keys = safetensors.torch.load_file(tmp_path / "checkpoints" / "step-000001.safetensors").keys()
    assert sorted(k for k in keys if k.startswith("module.")) == ["module.lora.4.bias", "module.lora.4.weight"]
    saved = model[4].weight.clone()
    model[4].weight.data.zero_()
    state.load_checkpoint(tmp_path, {"lora": state.Trainable(model)})
    assert torch.equal(model[4].weight, saved)


# ----------------------------------------------------------------------------------------------- loss log
def test_loss_log_truncates_on_resume(tmp_path, monkeypatch):
    log = state.LossLog(tmp_path)
    for s in range(1, 11):
        log.log(s, loss=s / 10, lr=torch.tensor(1e-4))
    log.log(11, loss=1.1, lr=1e-4, val=0.5)  # a new column: the header is rewritten
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,val" and lines[1] == "1,0.1,0.0001," and lines[-1] == "11,1.1,0.0001,0.5"
    resumed = state.LossLog(tmp_path, resume_step=5)
    resumed.log(6, loss=9.0, lr=1e-4)
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["step", "1", "2", "3", "4", "5", "6"]
    assert lines[-1] == "6,9,0.0001,"
    assert resumed.series()["loss"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (6, 9.0)]
    assert resumed.plot().is_file() and resumed.png == tmp_path / "loss.png"
    drawn = {}
    monkeypatch.setattr(state, "plot_curves", lambda series, path, title="": drawn.update(series))
    resumed.plot()
    assert sorted(drawn) == ["loss", "val"]  # learning rates live on another scale: not in loss.png
    state.LossLog(tmp_path)  # a fresh run in the same folder starts a new log
    assert (tmp_path / "loss.csv").read_text() == "step\n"


# ----------------------------------------------------------------------------------------------- NaN
def test_check_finite():
    state.check_finite(torch.tensor(0.5), 3)
    with pytest.raises(TrainingError) as e:
        state.check_finite(torch.tensor(float("nan")), 7)
    assert str(e.value) == "loss became NaN at step 7 (fp16 overflow? try --mixed-precision bf16/no or a lower lr)"
    with pytest.raises(TrainingError, match="inf at step 2 \\(lower the lr\\)"):
        state.check_finite(float("inf"), 2, hint="lower the lr")


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_matches_hand_computation():
    model = nn.BatchNorm1d(2)  # weight, bias + running-stat buffers
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0]))
    ema = state.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([3.0, 4.0]))
        model.running_mean.copy_(torch.tensor([7.0, 8.0]))
    ema.update(model)  # 0.9 * [1, 2] + 0.1 * [3, 4]
    assert torch.allclose(ema.module.weight, torch.tensor([1.2, 2.2]))
    assert torch.equal(ema.module.running_mean, torch.tensor([7.0, 8.0]))  # buffers are copied, not averaged
    with torch.no_grad():
        model.weight.copy_(torch.tensor([5.0, 6.0]))
    ema.update(model)  # 0.9 * [1.2, 2.2] + 0.1 * [5, 6]
    assert torch.allclose(ema.module.weight, torch.tensor([1.58, 2.58]))
    assert not ema.module.weight.requires_grad and model.weight.requires_grad
    ema.copy_to(model)
    assert torch.allclose(model.weight, torch.tensor([1.58, 2.58]))
