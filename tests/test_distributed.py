"""minidiff.distributed on CPU: two gloo processes, each with half the rows, train a LoRA exactly like one process
with all the rows (the gradient of the mean loss is the mean of the per-process gradients), and only rank 0 writes."""
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from minidiff import distributed
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
    distributed.broadcast_parameters(params, ctx)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        distributed.average_gradients(params, ctx)
        opt.step()
        opt.zero_grad()
    return {f"p{i}": p.detach().clone() for i, p in enumerate(params)}


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init(device="cpu")
    model, x, y = model_and_data()
    rows = distributed.shard(list(range(ROWS)), ctx)
    result = train(model, x[rows], y[rows], ctx)
    save_file(result, os.path.join(out, f"rank{rank}.safetensors"))
    if ctx.is_main:
        with open(os.path.join(out, "written-by-main.txt"), "a") as f:
            f.write(f"{rank}\n")
    distributed.barrier(ctx)
    distributed.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_all_rows(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    model, x, y = model_and_data()
    single = train(model, x, y, distributed.Context())
    for k in single:
        assert torch.equal(r0[k], r1[k])  # the ranks never drift apart
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single["p0"], model_and_data()[0][0].lora_A["default"])  # it did train
    assert (tmp_path / "written-by-main.txt").read_text() == "0\n"


def test_shard_splits_class_images_round_robin():
    ctx = distributed.Context(rank=1, world_size=2)
    assert distributed.shard(["a", "b", "c", "d", "e"], ctx) == ["b", "d"]
    assert distributed.shard(["a", "b"], distributed.Context()) == ["a", "b"]
