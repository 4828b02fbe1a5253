"""audit: the delta-W norms against the full matrix, the file report, the CLI, and the trainable-parameter table."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from minidiff.eval.audit import audit_lora, block_of, delta_norm, format_table, main, trainable_table
from minidiff.images import read_png_metadata
from minidiff.lora import inject_lora


@pytest.mark.parametrize("shape_A, shape_B", [((4, 96), (80, 4)), ((3, 16, 3, 3), (24, 3, 1, 1)), ((1, 7), (5, 1))])
def test_delta_norm_matches_the_full_matrix(shape_A, shape_B):
    A, B, alpha = torch.randn(shape_A), torch.randn(shape_B), 1.5
    r = shape_A[0]
    full = (alpha / r) * (B.flatten(1).double() @ A.flatten(1).double())  # [out, in * kh * kw]
    assert delta_norm(A, B, alpha) == pytest.approx(torch.linalg.matrix_norm(full).item(), rel=1e-10)


def fake_unet_lora(path):
    """A peft-named file with four modules in three blocks, random A and B, plus their ||dW|| by hand."""
    g = torch.Generator().manual_seed(0)
    mods = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (8, 4),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (12, 4),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (32, 2),
        "up_blocks.0.attentions.1.proj_out": (8, 4),
    }
    tensors, norms = {}, {}
    for name, (cin, r) in mods.items():
        A, B = torch.randn(r, cin, generator=g), torch.randn(8, r, generator=g) * (1 + len(norms))
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = A, B
        norms[name] = torch.linalg.matrix_norm(B.double() @ A.double()).item()  # no alpha in peft files: alpha = r
    save_file(tensors, path)
    return norms


def test_audit_report(tmp_path):
    norms = fake_unet_lora(tmp_path / "l.safetensors")
    rep = audit_lora(tmp_path / "l.safetensors")
    assert rep["format"] == "peft"
    assert [m["name"] for m in rep["modules"]] == sorted(norms, key=lambda n: -norms[n])
    for m in rep["modules"]:
        assert m["norm"] == pytest.approx(norms[m["name"]], rel=1e-9)
    assert list(rep["blocks"]) == ["down_blocks.1", "mid_block", "up_blocks.0"]
    d = norms["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] ** 2
    d += norms["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] ** 2
    assert rep["blocks"]["down_blocks.1"] == pytest.approx(math.sqrt(d), rel=1e-9)
    params = 4 * (8 + 8) + 4 * (12 + 8) + 2 * (32 + 8) + 4 * (8 + 8)
    assert rep["params"] == params and rep["bytes"] == 4 * params


def test_block_of_reads_both_namings():
    assert block_of("input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "input_blocks.4"
    assert block_of("down_blocks.2.attentions.1.proj_in") == "down_blocks.2"
    assert block_of("lora_unet_middle_block_1_proj_out") == "middle_block"
    assert block_of("time_embedding.linear_1.weight") == "time_embedding"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "minidiff.eval.audit", *map(str, args)], capture_output=True, text=True
    )


def test_cli_lists_file_and_writes_png(tmp_path):
    norms = fake_unet_lora(tmp_path / "l.safetensors")
    out = run_cli(tmp_path / "l.safetensors", "--png", tmp_path / "blocks.png")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[2]  # after the header lines: the largest module
    assert first.endswith(max(norms, key=norms.get))
    assert "total: 288 params" in out.stdout
    meta = read_png_metadata(tmp_path / "blocks.png")
    assert meta["format"] == "peft" and meta["params"] == 288


def test_cli_errors_are_one_line(tmp_path, capsys):
    save_file({"conv_in.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "x.safetensors").write_text("hello")
    for f, msg in (
        (tmp_path / "missing.safetensors", "not found"),
        (tmp_path / "model.safetensors", "no LoRA tensors"),
        (tmp_path / "x.safetensors", "not a readable safetensors"),
    ):
        assert main([str(f)]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_trainable_table_counts_by_hand():
    unet = nn.Module()
    unet.down_blocks = nn.ModuleList([nn.Module(), nn.Module()])
    unet.down_blocks[1].attn1 = nn.Module()
    unet.down_blocks[1].attn1.to_q = nn.Linear(8, 16, bias=False)
    unet.down_blocks[1].attn1.to_k = nn.Linear(8, 16, bias=False)
    unet.down_blocks[0].conv = nn.Conv2d(3, 8, 3)
    unet.mid_block = nn.Module()
    unet.mid_block.attn2 = nn.Module()
    unet.mid_block.attn2.to_v = nn.Linear(16, 4)
    te = nn.Module()
    te.self_attn = nn.Module()
    te.self_attn.q_proj = nn.Linear(6, 6)
    inject_lora(unet, "attn", rank=2)
    inject_lora(te, "text", rank=3)
    rows = trainable_table({"unet": unet, "text_encoder": te})
    total = 2 * 8 * 16 + 8 * 3 * 9 + 8 + 16 * 4 + 4 + 36 + 6  # every base parameter
    lora = {"down_blocks.1": 2 * 2 * (8 + 16), "mid_block": 2 * (16 + 4), "text_encoder": 3 * (6 + 6)}
    total += sum(lora.values())
    assert [r["group"] for r in rows] == ["down_blocks.1", "mid_block", "text_encoder", "total"]
    for r in rows[:-1]:
        assert r["params"] == lora[r["group"]] and r["dtype"] == "float32"
        assert r["share"] == pytest.approx(lora[r["group"]] / total)
    assert rows[0]["tensors"] == 4 and rows[-1]["tensors"] == 8 and rows[-1]["of"] == total
    text = format_table(rows)
    assert "down_blocks.1" in text and f"{total:,}" in text
