"""``lk3d estimate`` (``lk3d.tools.estimate``): the issue ceiling against the hand readings of the
SASS, the recorded launches and their specialisation, and the command on a tiny dense case
compiled for sm_90."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from lk3d.tools import aot, estimate, launch_record  # noqa: E402  (after the skip)

# The figures the hand readings used: 132 SMs at 1.98 GHz, bf16 tensor 790 TFLOP/s (measured),
# fp32 FMA 67 TFLOP/s, 4.3 TB/s.
H200_READ = dict(estimate.device_figures(90), tensor_tflops={"bf16": 790.0}, fma_tflops=67.0,
                 bandwidth_tbs=4.3)


def test_issue_ceiling_matches_hand_readings():
    # Implicit GEMM 128x64x32 on 4 warps: 438 instructions a step for 2*128*64*32 FLOPs.
    r = estimate.issue_ceiling(438, 4, 2 * 128 * 64 * 32, "tensor", H200_READ, "bf16",
                               flops=1e15, nbytes=1e6)
    assert r["issue"] == pytest.approx(313, rel=0.01)
    assert r["ceiling"] == r["issue"] and r["fraction"] == pytest.approx(0.396, rel=0.01)
    # Depthwise BLOCK 256 on 8 warps: 31 instructions for 2 FFMA per lane (2 FLOPs each).
    r = estimate.issue_ceiling(31, 8, 2 * 2 * 32 * 8, "fma", H200_READ, "bf16",
                               flops=1e15, nbytes=1e6)
    assert r["issue"] == pytest.approx(4.3, rel=0.01)
    assert r["fraction"] == pytest.approx(4.3 / 67, rel=0.01)


def test_issue_ceiling_caps():
    device = estimate.device_figures(90)
    # A step of one instruction per warp could issue far past the peak: the peak caps it.
    r = estimate.issue_ceiling(1, 4, 2 * 128 * 64 * 32, "tensor", device, "bf16", 1e15, 1e6)
    assert r["ceiling"] == r["peak"] == 989.4 and r["fraction"] == 1.0
    # 1 FLOP per byte at 3.35 TB/s: 3.35 TFLOP/s whatever the loop.
    r = estimate.issue_ceiling(100, 4, 2 * 128 * 64 * 32, "tensor", device, "bf16", 1e9, 1e9)
    assert r["ceiling"] == r["bandwidth"] == pytest.approx(3.35)
    assert math.isclose(r["fraction"], 3.35 / 989.4, rel_tol=1e-9)
    with pytest.raises(ValueError, match="arch: expected one of \\[80, 90\\], got 75"):
        estimate.device_figures(75)
    with pytest.raises(ValueError, match="unit: expected 'tensor' or 'fma', got 'sfu'"):
        estimate.peak_tflops(device, "sfu", "bf16")


def test_fallback_specialize_agrees_with_the_jit():
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.empty(2, 3, 4, 5, 64, dtype=torch.bfloat16, device="meta")
    values = [1, 0, 7, 16, 48, -32, 2 ** 31, 2 ** 31 + 16, True, False, None, 1.5,
              torch.empty(3, dtype=torch.bfloat16, device="meta"),
              torch.empty(4, dtype=torch.float32, device="meta"),
              TensorDescriptor.from_tensor(x, [1, 1, 8, 16, 64])]
    native = launch_record._specializer()
    for v in values:
        kind, attr = native(v)
        fallback = launch_record._fallback_specialize(v)
        assert fallback[0] == kind and bool(fallback[1]) == bool(attr), (v, native(v), fallback)
    with pytest.raises(TypeError, match="argument: expected a tensor, tensor descriptor, int, "
                                        "float, bool or None, got str"):
        launch_record._fallback_specialize("x")


@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
def test_depthwise_variants(pass_):
    """A depthwise pass the channels-innermost kernel serves records it first ("channels_last",
    what the planner runs) and the kernel other depthwise problems take as the alternative
    ("direct"), so the shipped ceilings price both; other problems have one variant."""
    conv = launch_record.Conv((2, 16, 9, 11, 7), (16, 1, 5, 3, 3), padding="same", groups=16)
    found = launch_record.variants(conv, pass_, 90)
    wgrad = "_wgrad" if pass_ == "grad_weight" else ""
    assert [(v, [ln.name for ln in lns]) for v, _, lns in found] == [
        ("channels_last", [f"conv3d_dw_cl{wgrad}_kernel"]),
        ("direct", [f"conv3d_dw{wgrad}_kernel"])]
    assert [launch_record.kernel_kind(lns[0]) for _, _, lns in found] == [
        f"depthwise_cl{wgrad}", f"depthwise{wgrad}"]
    other = launch_record.Conv((2, 13, 9, 11, 7), (26, 1, 5, 3, 3), padding="same", groups=13)
    assert [v for v, *_ in launch_record.variants(other, pass_, 90)] == ["direct"]


@pytest.mark.parametrize("pass_", launch_record.PASSES)
@pytest.mark.parametrize("op,conv", [
    ("dense", launch_record.Conv((2, 48, 11, 7, 9), (32, 48, 3, 5, 3), padding="same")),
    ("grouped", launch_record.Conv((1, 48, 7, 9, 5), (36, 16, 3, 3, 3), stride=2, groups=3)),
    ("depthwise", launch_record.Conv((2, 13, 9, 11, 7), (26, 1, 5, 3, 3), padding="same",
                                groups=13)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_recorded_launches(op, conv, pass_):
    """Each pass records the one launch its launcher makes on meta tensors, with the arch's
    default config; its executed FLOPs cover the op's, and the JIT's specialisation holds. The
    dense forward, (stride-1) grad-input and grad-weight take the tensor-descriptor kernels;
    the strided grouped ones the gather kernels."""
    from lk3d.kernels import implicit_gemm, tiled

    kernels = {name: getattr(tiled, name) for name in ("conv3d_igemm_kernel", "conv3d_dw_kernel")}
    variant, config, (launch,) = launch_record.tiled_launches(conv, pass_, 90)
    assert {n: getattr(tiled, n) for n in kernels} == kernels  # the recorders are gone
    assert isinstance(implicit_gemm.conv3d_desc_kernel, type(tiled.conv3d_igemm_kernel))
    descriptor = op == "dense"
    assert conv.op == op and variant == ("direct" if op == "depthwise" else
                                         "descriptor" if descriptor else "gather")
    expected = {("dense", "forward"): "conv3d_desc_kernel",
                ("dense", "grad_input"): "conv3d_desc_kernel",
                ("dense", "grad_weight"): "conv3d_desc_wgrad_kernel",
                ("grouped", "grad_weight"): "conv3d_wgrad_kernel",
                ("depthwise", "grad_weight"): "conv3d_dw_wgrad_kernel",
                ("depthwise", "forward"): "conv3d_dw_kernel",
                ("depthwise", "grad_input"): "conv3d_dw_kernel"}
    assert launch.name == expected.get((op, pass_), "conv3d_igemm_kernel")
    assert launch.num_warps == config["num_warps"] and launch.num_stages == config["num_stages"]
    assert all(launch.args[k] == v for k, v in config.items() if k.startswith("BLOCK"))
    assert launch_record.executed_flops(launch) >= launch_record.useful_flops(conv, pass_) > 0
    signature, constexprs, divisible = launch_record.specialize(launch)
    assert list(signature) == launch.kernel.arg_names
    for name, value in launch.args.items():
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            assert signature[name] == "constexpr" and constexprs[name] == 1, name
        elif signature[name].startswith("*"):
            assert name in divisible
        elif signature[name] in ("i32", "i64"):
            assert (name in divisible) == (value % 16 == 0), name


KEYS = ("case", "op", "pass", "variant", "arch", "dtype", "kernel", "kind", "config", "grid",
        "registers", "spill_bytes", "shared_bytes", "loop_instructions", "loop_counts",
        "executed_flops", "useful_flops", "bytes", "unit", "peak_tflops",
        "issue_ceiling_tflops", "fraction", "modelled_ms")


def test_estimate_command_errors(capsys):
    from lk3d.tools import cli

    base = ["estimate", "--input", "1,8,5,5,5", "--weight", "8,8,3,3,3"]
    for extra, message in (
            (["--passes", "forward,bwd"], "--passes: expected a comma-separated subset of "
                                          "forward,grad_input,grad_weight, got 'forward,bwd'"),
            (["--groups", "3"], "groups"),
            (["--arch", "75"], "--arch: invalid choice: 75"),
            (["--device", "a100", "--arch", "90"], "device: expected a GPU of sm_90 for --arch "
                                                   "90, got NVIDIA A100 SXM4 80GB (sm_80)"),
            (["--device", "h200", "--json", "x", "--cases", "goals", "--ceilings", "c.json"],
             "--device: expected without --out and --ceilings")):
        with pytest.raises(SystemExit) as exc:
            cli.main(base + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_device_figures():
    """The ceilings take the named GPU's figures (an H200's bandwidth on sm_90, the arch of
    --device by default), the arch's GPU without --device; this machine's only with a GPU."""
    h100, h200, a100 = (estimate.device_figures(a, d) for a, d in ((90, None), (90, "h200"),
                                                                   (80, "a100")))
    assert (h100["name"], h200["name"], a100["name"]) == (
        "NVIDIA H100 SXM5 80GB", "NVIDIA H200 SXM 141GB", "NVIDIA A100 SXM4 80GB")
    assert (h100["bandwidth_tbs"], h200["bandwidth_tbs"]) == (3.35, 4.8)
    assert h100["sms"] == h200["sms"] == 132 and a100["arch"] == 80
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: expected a CUDA device for 'cuda', got "
                                             "none on this machine"):
            estimate.device_figures(90, "cuda")


@pytest.mark.xdist_group("aot")
@pytest.mark.skipif(not os.path.exists(aot.CUOBJDUMP),
                    reason=f"no cuobjdump bundled with triton at {aot.CUOBJDUMP}")
def test_estimate_command_sm90(tmp_path, capsys):
    """``lk3d estimate --json`` on a tiny dense case: two compiles for sm_90, every key present
    and sane, the tensor-core loop counted."""
    from lk3d.tools import cli

    path = tmp_path / "estimate.json"
    assert cli.main(["estimate", "--arch", "90", "--input", "1,64,5,7,3", "--weight",
                     "64,64,3,3,3", "--dtype", "bf16", "--padding", "same", "--passes",
                     "forward", "--case-id", "tiny", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv3d_desc_kernel" in out and "H100 SXM" in out
    r, fallback = json.loads(path.read_text())  # the kernel and the one the others take
    assert tuple(r) == tuple(fallback) == KEYS
    assert (r["case"], r["op"], r["pass"], r["variant"], r["arch"], r["dtype"], r["unit"]) == (
        "tiny", "dense", "forward", "descriptor", 90, "bf16", "tensor")
    assert r["kernel"] == "conv3d_desc_kernel" and r["kind"] == "implicit_gemm_desc"
    assert (fallback["variant"], fallback["kernel"], fallback["kind"]) == (
        "gather", "conv3d_igemm_kernel", "implicit_gemm")
    assert r["grid"] == [5]  # one 8 x 16 brick of each of the 5 output planes
    assert r["config"] == dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=64, BLOCK_K=64, num_warps=4,
                               num_stages=3)
    assert r["loop_counts"]["HGMMA"] >= 1 and r["loop_counts"]["UTMALDG"] >= 1
    assert r["loop_instructions"] == sum(r["loop_counts"].values())
    assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["shared_bytes"] > 0
    # 105 outputs of 64 channels, 2·64·27 FLOPs each; each program computes 128 rows.
    assert r["useful_flops"] == 2 * 64 * 27 * 105 * 64
    assert r["executed_flops"] == 2 * 5 * 128 * 64 * 64 * 27
    # input, output and packed weight once, and the launcher's copies (the NCDHW input to
    # NDHWC, the weight packed), each read and written once
    assert r["bytes"] == 2 * (64 * 105 * 2 + 64 * 64 * 27) + 2 * 2 * (64 * 105 + 64 * 64 * 27)
    assert r["peak_tflops"] == 989.4
    assert 0 < r["issue_ceiling_tflops"] <= r["peak_tflops"]
    assert r["fraction"] == pytest.approx(r["issue_ceiling_tflops"] / r["peak_tflops"])
    assert r["modelled_ms"] == pytest.approx(
        r["executed_flops"] / (r["issue_ceiling_tflops"] * 1e12) * 1e3)


def test_recorded_bias_launch():
    """With a bias, lk3d.conv3d's backward launches the grad-bias reduction: its own pass, one
    add per output element (the voxels padded to the split's BLOCK_S steps); CP and
    block-sparse sum their bias gradients in torch, so their passes do not change."""
    conv = launch_record.Conv((2, 6, 5, 7, 3), (4, 6, 3, 3, 3), padding="same", bias=True)
    assert conv.passes == launch_record.PASSES + ("grad_bias",) and conv.id.endswith("-bias")
    variant, config, (launch,) = launch_record.launches(conv, "grad_bias", 90)
    assert (variant, launch.name, launch_record.kernel_kind(launch)) == (
        "direct", "bias_grad_kernel", "bias_grad")
    assert launch.args["BLOCK_S"] == config["BLOCK_S"] and math.prod(launch.grid) == 4
    assert launch_record.useful_flops(conv, "grad_bias") == 4 * 2 * 105
    steps = -(-210 // config["BLOCK_S"])  # 2 x 105 voxels per channel
    assert launch_record.executed_flops(launch) == 4 * config["BLOCK_S"] * steps
    with pytest.raises(ValueError, match="pass: expected one of \\('forward', 'grad_input', "
                                         "'grad_weight'\\), got 'grad_bias'"):
        launch_record.launches(launch_record.Conv((2, 6, 5, 7, 3), (4, 6, 3, 3, 3)),
                               "grad_bias", 90)
    for other in (dict(rank=2), dict(block=(2, 2, 1, 1, 1), density=0.5)):
        assert "grad_bias" not in launch_record.Conv((1, 4, 5, 5, 5), (4, 4, 3, 3, 3),
                                                     bias=True, **other).passes


def test_recorded_cp_launches():
    """CP, separable (the default): four forward launches (U_in projection, W, H, D with the
    U_out projection) and eight backward ones, executing the separable FLOP count to within the
    tiles' padding and moving x, y and the R-channel intermediates. Fused: the forward's one
    launch; the backward's grad-input (with grad U_in partials) and factor-sum launches, each
    with its own config and SPLIT programs."""
    conv = launch_record.Conv((2, 24, 7, 9, 5), (40, 24, 5, 3, 3), padding="same", rank=5)
    assert conv.op == "cp" and conv.passes == ("forward", "backward") and conv.id.endswith("-R5")
    variant, config, fwd = launch_record.launches(conv, "forward", 90)
    assert variant == "separable" and [ln.name for ln in fwd] == ["cp_sep_kernel"] * 4
    assert [(ln.args["PROJECT"], ln.args["AXIS"], ln.args["K"], ln.args["OUT_PROJ"])
            for ln in fwd] == [(True, 0, 1, False), (False, 2, 3, False), (False, 1, 3, False),
                               (False, 0, 5, True)]
    useful = launch_record.useful_flops(conv, "forward")
    # R = 5 runs as R_PAD = 16 lanes over whole 128-voxel tiles (630 voxels: 5 tiles), and
    # channels round up to their blocks (24 -> 32, 40 -> 64).
    executed = sum(launch_record.executed_flops(ln) for ln in fwd)
    assert executed == 2 * 16 * 640 * (32 + 3 + 3 + 5 + 64) >= useful
    _, _, bwd = launch_record.launches(conv, "backward", 90)
    assert len(bwd) == 8 and all(ln.name == "cp_sep_kernel" for ln in bwd)
    assert (sum(launch_record.executed_flops(ln) for ln in bwd)
            >= launch_record.useful_flops(conv, "backward"))
    variant, config, (launch,) = launch_record.cp_launches(conv, "forward", 90, "fused")
    assert (variant, launch.name, launch.args["R"]) == ("fused", "cp_conv_kernel", 5)
    assert launch.args["EMIT_GQ"] is False and "SPLIT" not in config
    assert launch_record.executed_flops(launch) >= launch_record.useful_flops(conv, "forward") > 0
    _, _, (grad_input, factors) = launch_record.cp_launches(conv, "backward", 90, "fused")
    assert (grad_input.name, factors.name) == ("cp_conv_kernel", "cp_grad_kernel")
    assert grad_input.args["EMIT_GQ"] is True and grad_input.args["TRANSPOSED"] is True
    for ln in (grad_input, factors):
        assert math.prod(ln.grid) == ln.config["SPLIT"] and ln.config["num_warps"] == ln.num_warps
    assert (launch_record.executed_flops(grad_input) + launch_record.executed_flops(factors)
            >= launch_record.useful_flops(conv, "backward"))
    with pytest.raises(ValueError, match="pass: expected one of \\('forward', 'backward'\\), "
                                         "got 'grad_input'"):
        launch_record.launches(conv, "grad_input", 90)


def test_recorded_block_sparse_launches(capsys):
    """Block-sparse: one launch per pass over a meta block index of the density's share of the
    blocks; 16-channel blocks on the tensor-descriptor kernels (variant "descriptor", the
    gather kernels their alternative "sparse"); the executed FLOPs are
    the dense count times the density where blocks fill the tiles, depthwise blocks too
    (elementwise: one product per channel); half-given options are refused."""
    conv = launch_record.Conv((1, 32, 5, 7, 3), (48, 32, 3, 3, 3), padding="same",
                         block=(16, 16, 1, 1, 1), density=0.3)
    assert conv.op == "block_sparse" and conv.nnz == round(0.3 * 3 * 2 * 27)
    names = {"forward": "bs_conv3d_kernel", "grad_input": "bs_conv3d_kernel",
             "grad_values": "bs_conv3d_wgrad_kernel"}
    for pass_ in conv.passes:
        (variant, _, (desc,)), *recorded = launch_record.variants(conv, pass_, 80)
        assert variant == "descriptor" and desc.name == "bs_conv3d_desc_" + (
            "wgrad_kernel" if pass_ == "grad_values" else "kernel")
        assert launch_record.kernel_kind(desc) == "block_sparse_desc" + (
            "_wgrad" if pass_ == "grad_values" else "")
        if pass_ == "grad_values":  # groups of 4 entries of one block row, rows padded
            a = desc.args
            assert a["GROUP"] == 4 and conv.nnz <= 4 * a["GROUPS"] <= conv.nnz + 4 * 3 + 3
            rows = a["NUM_M"] * a["BLOCK_H"] * a["BLOCK_W"]
            assert launch_record.executed_flops(desc) == 2 * rows * 16 * 16 * 4 * a["GROUPS"]
        else:  # every stored block over 4 x 16 bricks of the 7 x 3 planes (8 x 16 rows), 5 deep
            assert launch_record.executed_flops(desc) == 2 * 5 * 8 * 16 * 16 * 16 * conv.nnz
        (variant, config, (launch,)), = recorded
        assert variant == "sparse" and launch.name == names[pass_]
        executed = launch_record.executed_flops(launch)
        useful = launch_record.useful_flops(conv, pass_)
        assert useful == pytest.approx(2 * 32 * 27 * 48 * 105 * 0.3, rel=0.02)
        assert executed >= useful * 0.98
        assert launch_record.kernel_kind(launch) == "block_sparse_16x16" + (
            "_wgrad" if pass_ == "grad_values" else "")
    # Depthwise: 8-channel blocks of 3x3x1 tap bricks, 3 of the 2 x 3 blocks of a 16-channel 3³
    # weight; one [128 voxels, 8 channels] tile of products per block and tap (105 voxels).
    dw = launch_record.Conv((1, 16, 5, 7, 3), (16, 1, 3, 3, 3), padding="same", groups=16,
                            block=(8, 1, 3, 3, 1), density=0.5)
    assert dw.nnz == 3
    for pass_ in dw.passes:
        _, _, (launch,) = launch_record.launches(dw, pass_, 90)
        assert launch.name == names[pass_] and launch.args["DEPTHWISE"] is True
        assert launch_record.kernel_kind(launch) == "block_sparse_depthwise" + (
            "_wgrad" if pass_ == "grad_values" else "")
        useful = launch_record.useful_flops(dw, pass_)
        assert useful == 2 * 27 * 16 * 105 * 0.5
        assert launch_record.executed_flops(launch) == 2 * 128 * 8 * 3 * 9
    from lk3d.tools import cli

    with pytest.raises(SystemExit):
        cli.main(["estimate", "--input", "1,32,5,7,3", "--weight", "48,32,3,3,3",
                  "--block", "16,16,1,1,1"])
    assert "expected --block and --density together" in capsys.readouterr().err


def test_goal_cases_as_convolutions():
    from lk3d.tools.bench_cases import GOAL_CASES

    convs = {c.name: estimate.conv_of(c) for c in GOAL_CASES}
    g1, g4, g5 = convs["G1"], convs["G4"], convs["G5-d10"]
    assert (g1.op, g1.input, g1.weight, g1.groups, g1.dtype, g1.padding) == (
        "depthwise", (2, 48, 96, 96, 96), (48, 1, 21, 21, 21), 48, "bf16", "same")
    assert (g4.op, g4.rank, g4.weight) == ("cp", 16, (64, 64, 21, 21, 21))
    assert (g5.op, g5.block, g5.density, g5.input) == (
        "block_sparse", (16, 16, 1, 1, 1), 0.1, (1, 64, 32, 32, 32))
    assert convs["G3-k11"].op == "dense" and convs["G3-k11"].weight[2:] == (11, 11, 11)


def test_estimate_cases_report(tmp_path, capsys, monkeypatch):
    """``--cases SET --out DIR``: every case estimated, the report written (estimate records
    stand in for the compiles here)."""
    from lk3d.tools import cli
    from lk3d.tools.bench_cases import TINY_CASES

    def fake(conv, arch, passes=None, case_id=None, device=None):
        return [dict({k: 0 for k in KEYS}, case=case_id, op=conv.op, arch=arch, kernel="k_kernel",
                     grid=[3], config={"BLOCK_M": 64}, loop_counts={"FFMA": 7, "LDG": 2},
                     unit="fma", peak_tflops=66.9, issue_ceiling_tflops=6.69, fraction=0.1,
                     **{"pass": p}) for p in (passes or conv.passes)]

    monkeypatch.setattr(estimate, "estimate", fake)
    out = tmp_path / "static-sm90"
    assert cli.main(["estimate", "--cases", "tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    expected = sum(len(estimate.conv_of(c).passes) for c in TINY_CASES)
    assert f"wrote {expected} launches" in text
    rows = (out / "estimate.csv").read_text().splitlines()
    assert len(rows) == 1 + expected and rows[1].split(",")[13] == "FFMA:7 LDG:2"
    assert {r["case"] for r in json.loads((out / "estimate.json").read_text())} == {
        c.name for c in TINY_CASES}
    assert json.loads((out / "about.json").read_text())["arch"] == 90
    assert (out / "fraction.png").exists() or "plot skipped" in text


def test_estimate_cases_errors(capsys):
    from lk3d.tools import cli

    for argv, message in (
            (["--cases", "tiny", "--input", "1,8,5,5,5"], "--cases: expected no --input"),
            (["--input", "1,8,5,5,5", "--weight", "8,8,3,3,3", "--out", "x"],
             "--out: expected with --cases"),
            (["--cases", "/no/such/cases.json"], "--cases:"),
            (["--input", "1,8,5,5,5", "--weight", "8,8,3,3,3", "--ceilings", "x.json"],
             "--ceilings: expected with --cases"),
            (["--input", "1,8,5,5,5", "--weight", "8,8,3,3,3", "--measured", "r.csv"],
             "--measured: expected with --cases"),
            (["--cases", "tiny", "--measured", "/no/such/results.csv"],
             "--measured: /no/such/results.csv: cannot read"),
            ([], "expected --input and --weight")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["estimate"] + argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
