"""minidiff.lora: the math on plain layers (closed forms) and the target presets on SDXL-shaped UNets.

Every comparison is against an independent reference: a hand-computed W0 x + (alpha/r) B A x, torch's own conv,
or peft on diffusers' UNet with identical weights. The files (kohya / diffusers / peft) are in test_lora_files.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff.errors import LoRAError
from minidiff.lora import (
    LoRAConv2d,
    disable_lora,
    enable_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
    unmerge_lora,
)


class Block(nn.Module):
    """Module names as in a diffusers transformer block, small enough to check by hand."""

    def __init__(self, c=8, ctx=6):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q, self.attn1.to_k = nn.Linear(c, c, bias=False), nn.Linear(c, c, bias=False)
        self.attn1.to_v, self.attn1.to_out = (
            nn.Linear(c, c, bias=False),
            nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)]),
        )
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(2 * c, c)])
        self.ff.net[0].proj = nn.Linear(c, 2 * c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # x [N, c]
        h = self.attn1.to_out[0](self.attn1.to_q(x) * self.attn1.to_k(x).sigmoid() + self.attn1.to_v(x))
        return h + self.ff.net[2](self.ff.net[1](self.ff.net[0].proj(h)))


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------------ the math
def test_zero_B_leaves_output_unchanged():
    model, x = Block(), torch.randn(5, 8)
    ref = model(x)
    inject_lora(model, ["to_q", "to_k", "to_v", r"to_out\.0", r"ff\.net\.2"], rank=4, init="kaiming")
    assert all(layer.lora_A["default"].abs().sum() > 0 for layer in lora_layers(model).values())  # A random
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_alpha_over_r_scale_by_hand():
    lin = nn.Linear(3, 2)
    inject_lora_on = nn.Sequential(lin)
    inject_lora(inject_lora_on, ["0"], rank=2, alpha=1.0)
    layer = inject_lora_on[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
        layer.lora_A["default"].copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))  # A x = [x0+x1, x2]
        layer.lora_B["default"].copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))  # B A x = [2(x0+x1), 4 x2]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # W0 x + b = [1+6+0.5, 2-0.5] = [7.5, 1.5]; (alpha/r) B A x = 0.5 * [6, 12] = [3, 6]
    torch.testing.assert_close(layer(x), torch.tensor([[10.5, 7.5]]))
    set_lora_scale(inject_lora_on, 2.0)  # multiplier 2: + [6, 12]
    torch.testing.assert_close(layer(x), torch.tensor([[13.5, 13.5]]))
    disable_lora(inject_lora_on)
    torch.testing.assert_close(layer(x), torch.tensor([[7.5, 1.5]]))
    enable_lora(inject_lora_on)
    torch.testing.assert_close(layer(x), torch.tensor([[13.5, 13.5]]))


def test_merge_equals_unmerged_and_unmerge_restores_W0():
    model, x = Block(), torch.randn(5, 8)
    inject_lora(model, "attn-ff", rank=3, alpha=6)
    randomize_lora(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    set_lora_scale(model, 0.7)
    ref = model(x)
    merge_lora(model)
    assert any(not torch.equal(p, w0[n]) for n, p in model.named_parameters() if n in w0)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoRAError, match="unmerge"):
        set_lora_scale(model, 1.0)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_conv_lora_matches_merged_conv_closed_form():
    for k in (1, 3):
        conv = nn.Conv2d(4, 6, k, padding=k // 2, stride=2 if k == 3 else 1)
        model = nn.Sequential(conv)
        inject_lora(model, ["0"], rank=2, alpha=1.0)
        randomize_lora(model)
        layer = model[0]
        assert isinstance(layer, LoRAConv2d) and layer.lora_A["default"].shape == (2, 4, k, k)
        A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        w = conv.weight.detach() + 0.5 * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)  # W0 + (alpha/r) B A
        x = torch.randn(2, 4, 9, 9)
        ref = nn.functional.conv2d(x, w, conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_A_and_B_and_base_stays_bit_identical():
    model, x = Block(), torch.randn(16, 8)
    names = inject_lora(model, "attn-ff", rank=4, dropout=0.1)
    assert names == ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default" for n in names for ab in "AB"}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
    assert len(opt.state) == 2 * len(names)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert all(layer.lora_B["default"].abs().sum() > 0 for layer in lora_layers(model).values())


def test_several_adapters_add_up_with_their_own_scales():
    model, x = Block(), torch.randn(4, 8)
    base = model.attn1.to_q(x)
    inject_lora(model, "attn", rank=2, name="character")
    inject_lora(model, "attn", rank=3, alpha=1.5, name="style", init="kaiming")
    randomize_lora(model)
    set_lora_scale(model, 0.8, name="character")
    set_lora_scale(model, -0.3, name="style")
    q = model.attn1.to_q
    expect = base + sum(m * (x @ q.delta_weight(n).T) for n, m in (("character", 0.8), ("style", -0.3)))
    torch.testing.assert_close(q(x), expect, rtol=1e-5, atol=1e-5)
    disable_lora(model, "style")
    torch.testing.assert_close(q(x), base + 0.8 * x @ q.delta_weight("character").T, rtol=1e-5, atol=1e-5)
    assert len(lora_parameters(model, "style")) == 8 and len(lora_parameters(model)) == 16


def test_fp16_base_keeps_fp32_lora():
    model = Block().half()
    inject_lora(model, "attn", rank=2)
    randomize_lora(model)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    x = torch.randn(3, 8)
    q = model.attn1.to_q
    y = q(x.half())
    assert y.dtype == torch.float16
    ref = x @ q.weight.float().T + x @ q.delta_weight("default").T
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_under_autocast_the_lora_path_is_the_textbook_one_bit_for_bit():
    """bf16 weights, fp32 A and B, bf16 autocast (what training on a GPU does in fp16): the output is exactly
    W0 x + (alpha/r) B A x with each matmul run by autocast in bf16, and alpha = r multiplies by nothing."""
    model = Block().to(torch.bfloat16)
    inject_lora(model, "attn", rank=2, alpha=2)
    randomize_lora(model)
    q, x = model.attn1.to_q, torch.randn(3, 8).to(torch.bfloat16)
    A, B = q.lora_A["default"], q.lora_B["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        ref = F.linear(x, q.weight) + F.linear(F.linear(x.float(), A), B)
        set_lora_scale(model, 0.5)
        y_half, ref_half = q(x), F.linear(x, q.weight) + 0.5 * F.linear(F.linear(x.float(), A), B)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref) and torch.equal(y_half, ref_half)


def test_base_checkpoint_still_loads_strictly_after_injection():
    model = Block()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, "attn-ff", rank=2)
    randomize_lora(model)
    lora_before = [p.detach().clone() for p in lora_parameters(model)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(sd)  # strict: same keys as before injection
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)
    full = {k: v.clone() for k, v in model.state_dict().items()}  # with adapters: a training checkpoint
    assert "attn1.to_q.lora_A.default" in full
    model.load_state_dict(full)
    for p, q in zip(lora_parameters(model), lora_before):
        assert not torch.equal(p, q)  # +1 above, and the full state dict carried that
    bad = dict(full)
    bad.pop("attn1.to_q.lora_B.default")
    with pytest.raises(RuntimeError, match="lora_B"):
        model.load_state_dict(bad)  # a partial adapter in a checkpoint is still an error


def test_bad_settings():
    with pytest.raises(LoRAError, match="rank"):
        inject_lora(Block(), rank=0)
    with pytest.raises(LoRAError, match="rank"):
        inject_lora(Block(), rank=-2)
    with pytest.raises(LoRAError, match="unknown LoRA targets"):
        inject_lora(Block(), targets="everything")
    with pytest.raises(LoRAError, match="match no"):
        inject_lora(Block(), targets="text")
    with pytest.raises(LoRAError, match="init"):
        inject_lora(Block(), init="xavier")
    model = Block()
    inject_lora(model)
    with pytest.raises(LoRAError, match="already exists"):
        inject_lora(model)


# ------------------------------------------------------------------------------------ the UNet: presets
def tiny_unets():
    """Our tiny SDXL UNet and diffusers' UNet2DConditionModel with identical weights (keys are the same)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from minidiff.unet import UNet, UNetConfig

    cfg = UNetConfig.tiny_sdxl()
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    ref = DiffusersUNet.from_config(cfg.to_diffusers()).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.tensor([417]),
        torch.randn(1, 8, 96, generator=g),
        torch.randn(1, 64, generator=g),
        torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]),
    )


@torch.no_grad()
def run_ours(unet):
    return unet(*unet_inputs())


@torch.no_grad()
def run_diffusers(unet):
    x, t, ctx, pooled, ids = unet_inputs()
    return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


PEFT_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}


@pytest.mark.parametrize("preset", ["attn", "attn-ff"])
def test_presets_on_tiny_sdxl_match_peft(preset):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    ours, ref = tiny_unets()
    names = inject_lora(ours, preset, rank=4)
    ref.add_adapter(LoraConfig(r=4, target_modules=PEFT_TARGETS[preset]))
    theirs = [n for n, m in ref.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(names) == sorted(theirs)
    assert sum(p.numel() for p in lora_parameters(ours)) == sum(
        p.numel() for n, p in ref.named_parameters() if "lora_" in n
    )
    c = (
        ours.config
    )  # by hand: transformer blocks = down levels x L + up levels x (L + 1) + mid, 8 (or 10 + 2 proj) Linears
    L, blocks = (
        c.layers_per_block,
        sum(d * (2 * c.layers_per_block + 1) for d in c.transformer_depth) + c.mid_transformer_depth,
    )
    wrappers = sum(2 * L + 1 for d in c.transformer_depth if d) + 1
    assert len(names) == (8 * blocks if preset == "attn" else 10 * blocks + 2 * wrappers)


def test_all_linear_and_conv_presets_on_tiny_sdxl():
    from diffusers.models.resnet import ResnetBlock2D

    ours, ref = tiny_unets()
    linears = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(inject_lora(ours, "all-linear", rank=2)) == sorted(linears)
    ours, ref = tiny_unets()
    convs = [
        f"{n}.{c}"
        for n, m in ref.named_modules()
        if isinstance(m, ResnetBlock2D)
        for c in ("conv1", "conv2", "conv_shortcut")
        if getattr(m, c, None) is not None
    ]
    convs += [n for n, m in ref.named_modules() if n.endswith(("downsamplers.0.conv", "upsamplers.0.conv"))]
    names = inject_lora(ours, "conv", rank=2)
    assert sorted(names) == sorted(convs) and all(isinstance(ours.get_submodule(n), LoRAConv2d) for n in names)


def test_full_sdxl_on_meta_attn_is_560_modules_and_5806080_params():
    from minidiff.unet import UNet, UNetConfig

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet(UNetConfig.sdxl())
    names = inject_lora(unet, "attn", rank=4)
    assert len(names) == 560
    assert sum(p.numel() for p in lora_parameters(unet)) == 5_806_080  # 14 C r + 4096 r per block
    assert len(inject_lora(unet, "attn-ff", rank=4, name="kohya")) == 722  # kohya networks/lora.py
    inject_lora(unet, ["resnets.0.conv1"], rank=2, name="conv")
    # kohya's own names and shapes, what sd-scripts writes for SDXL
    # (https://github.com/kohya-ss/sd-scripts/blob/48d368fa/networks/lora.py)
    sd = lora_state_dict(unet, "kohya", name="kohya")
    assert len(sd) == 3 * 722
    for key, shape in [
        ("input_blocks_4_1_proj_in.lora_down.weight", (4, 640)),
        ("input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight", (640, 4)),
        ("input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight", (4, 2048)),
        ("middle_block_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight", (10240, 4)),
        ("output_blocks_0_1_transformer_blocks_9_attn1_to_out_0.lora_up.weight", (1280, 4)),
        ("output_blocks_5_1_proj_out.alpha", ()),
    ]:
        assert sd["lora_unet_" + key].shape == shape, key
    assert lora_state_dict(unet, "kohya", name="conv")[
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"
    ].shape == (2, 320, 3, 3)
