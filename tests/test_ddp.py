"""minidiff.train.ddp on CPU: two gloo processes, each with half the rows, train a LoRA exactly like one process
with all the rows (the gradient of the mean loss is the mean of the per-process gradients), and only rank 0 writes.

The second half runs finetune.py itself as torchrun would (RANK / WORLD_SIZE / MASTER_* in the environment, two
spawned processes): the class images are split between the processes yet identical to a one-process run, the LoRA
of 2 processes x --batch-size 1 equals that of 1 process x --batch-size 2 (fp32 tolerance), a resume works on both
processes, and process 1 writes nothing but its share of the class images (watched with a sys.addaudithook)."""

import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from minidiff.train import ddp
from minidiff.lora import inject_lora, lora_parameters

ROWS, STEPS = 8, 3


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    inject_lora(model, targets=[r"0", r"2"], rank=2)
    for p in lora_parameters(model):  # B = 0 would make A's first gradient zero: start from a non-trivial LoRA
        p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(ROWS, 6, generator=g), torch.randn(ROWS, 4, generator=g)


def train(model, x, y, ctx):
    params = lora_parameters(model)
    ddp.broadcast_parameters(params, ctx)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ddp.average_gradients(params, ctx)
        opt.step()
        opt.zero_grad()
    return {f"p{i}": p.detach().clone() for i, p in enumerate(params)}


def worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    ctx = ddp.init(device="cpu")
    model, x, y = model_and_data()
    rows = list(range(ROWS))[ctx.rank :: ctx.world_size]  # this process's share: rows r, r + W, ...
    result = train(model, x[rows], y[rows], ctx)
    save_file(result, os.path.join(out, f"rank{rank}.safetensors"))
    if ctx.is_main:
        with open(os.path.join(out, "written-by-main.txt"), "a") as f:
            f.write(f"{rank}\n")
    ddp.barrier(ctx)
    ddp.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_all_rows(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    model, x, y = model_and_data()
    single = train(model, x, y, ddp.Context())
    for k in single:
        assert torch.equal(r0[k], r1[k])  # the ranks never drift apart
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single["p0"], model_and_data()[0][0].lora_A["default"])  # it did train
    assert (tmp_path / "written-by-main.txt").read_text() == "0\n"


# ----------------------------------------------------------------------------------------------- finetune.py, 2 ranks
def finetune_worker(rank, world, runs, watch):
    """One torchrun process of finetune.py, for each (port, argv, report) in `runs` in turn (a fresh process group
    each time); report-<rank>.json gets the exit status and every file it created, renamed or deleted under `watch`."""
    import finetune  # here, not at the top: the spawned processes of the first test need not load it

    torch.set_num_threads(1)
    writes = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            if (mode and set(mode) & set("wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                writes.append(os.fspath(args[0]))
        elif event in ("os.rename", "os.remove") and isinstance(args[0], (str, os.PathLike)):
            writes.extend(os.fspath(a) for a in args[: 2 if event == "os.rename" else 1])

    sys.addaudithook(hook)
    for port, argv, report in runs:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        writes.clear()
        rc = finetune.main(argv)
        mine = sorted({w for w in writes if os.path.abspath(w).startswith(watch)})
        with open(f"{report}-{rank}.json", "w") as f:
            json.dump({"rc": rc, "writes": mine}, f)


def _lora(path):
    return load_file(str(path))


def test_torchrun_finetune_trains_like_one_process_and_only_rank0_writes(tmp_path):
    import finetune
    from minidiff.weights.pretrained import save_pipeline
    from conftest import tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _finetune_runs(tmp_path, finetune, save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny"))
    finally:
        torch.set_num_threads(threads)


def _finetune_runs(tmp_path, finetune, model):
    model = str(model)
    common = [
        "--model",
        model,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--num-class-images",
        "3",
        "--class-steps",
        "2",
        "--class-batch-size",
        "1",
        "--validation-steps",
        "2",
        "--validation-images",
        "1",
        "--min-snr-gamma",
        "5",
        "--noise-offset",
        "0.05",
        "--validate-every",
        "2",
        "--device",
        "cpu",
    ]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    assert finetune.main([*common, "--batch-size", "2", "--out", one, "--class-dir", tmp_path / "class1"]) == 0

    fresh = [*common, "--batch-size", "1", "--out", two, "--class-dir", tmp_path / "class2"]
    resume = [
        *common,
        "--batch-size",
        "1",
        "--out",
        resumed,
        "--class-dir",
        tmp_path / "class1",  # (one spawn:
        "--resume",
        one / "checkpoints" / "step-000002.safetensors",
        "--validation-images",
        "0",
    ]  # 10 s each)
    runs = [
        (free_port(), [str(a) for a in argv], str(tmp_path / report))
        for argv, report in ((fresh, "report"), (resume, "again"))
    ]
    mp.spawn(finetune_worker, args=(2, runs, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1))
    assert r0["rc"] == r1["rc"] == 0
    assert str(two / "lora.safetensors") in r0["writes"]  # the watch sees the writes

    # the class images: process 1 made image 1 (batches of 1, round robin), the set equals the one-process set
    finals = [w for w in r1["writes"] if w.endswith(".png")]
    assert finals == [str(tmp_path / "class2" / "class-00001.png")], r1["writes"]
    assert all(w.startswith(str(tmp_path / "class2")) for w in r1["writes"]), r1["writes"]  # nothing else
    for i in range(3):
        name = f"class-{i:05d}.png"
        assert (tmp_path / "class1" / name).read_bytes() == (tmp_path / "class2" / name).read_bytes(), name

    # process 0 wrote every output file; 2 x batch 1 trained like 1 x batch 2
    for name in (
        "lora.safetensors",
        "lora-step-000002.safetensors",
        "checkpoints/step-000004.safetensors",
        "loss.csv",
        "loss.png",
        "samples/step-000002.png",
        "samples/final.png",
        "manifest.json",
    ):
        assert (two / name).is_file(), name
    settings = json.loads((two / "manifest.json").read_text())["settings"]
    assert settings["processes"] == 2 and settings["global_batch_size"] == 2
    a, b = _lora(one / "lora.safetensors"), _lora(two / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    start = _lora(one / "lora-step-000002.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in a if "lora_up" in k)  # training moved between 2 and 4
    rows_one, rows_two = ((d / "loss.csv").read_text().splitlines() for d in (one, two))
    assert rows_one[0] == rows_two[0] and len(rows_two) == 5
    for x, y in zip(rows_one[1:], rows_two[1:]):  # the logged loss is the global batch's
        torch.testing.assert_close(
            torch.tensor([float(v) for v in y.split(",")]),
            torch.tensor([float(v) for v in x.split(",")]),
            rtol=1e-4,
            atol=1e-7,
        )

    # both processes resume from the one-process checkpoint at step 2 and end where it ended
    assert json.loads((tmp_path / "again-1.json").read_text()) == {"rc": 0, "writes": []}
    c = _lora(resumed / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-6)
    assert json.loads((resumed / "manifest.json").read_text())["resumed_from_step"] == 2
