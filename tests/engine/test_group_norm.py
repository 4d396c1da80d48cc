"""The group-norm statistics kernel: parity with float64, the compiled path that uses it, and where it stays out."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from lcmserve.engine.kernels import group_norm as gn

if shutil.which("cc") is None or shutil.which("c++") is None:
    pytest.skip("no C and C++ compiler to build the kernel with", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def loaded(tmp_path_factory):
    return gn.load_kernel(tmp_path_factory.mktemp("kernel-cache"))


def nhwc(shape, dtype, gen, offset=0.0, scale=1.0):
    x = torch.randn(shape, generator=gen) * scale + offset
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def exact_stats(x, groups, eps):
    var, mean = torch.var_mean(x.double().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((3, 32, 64, 64), 16), ((2, 16, 33, 7), 16), ((1, 96, 8, 8), 16),
                                          ((2, 24, 5, 9), 3), ((2, 40, 16, 16), 1), ((1, 320, 4, 4), 32),
                                          ((2, 8, 1, 70), 2)])
def test_stats_match_float64(shape, groups, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + groups)
    x = nhwc(shape, dtype, gen, offset=0.5, scale=2.0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean, rstd = gn.group_norm_stats(x, groups, 1e-5)
    assert mean.shape == rstd.shape == (shape[0], groups) and mean.dtype == rstd.dtype == torch.float32
    exact_mean, exact_rstd = exact_stats(x, groups, 1e-5)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), exact_rstd, rtol=1e-5, atol=1e-6)


def test_stats_keep_their_precision_far_from_zero():
    """A mean 10^4 standard deviations from zero: the shifted sums must not cancel the variance away."""
    gen = torch.Generator().manual_seed(0)
    x = nhwc((2, 32, 64, 64), torch.float32, gen, offset=1000.0, scale=0.1)
    mean, rstd = gn.group_norm_stats(x, 16, 1e-5)
    exact_mean, exact_rstd = exact_stats(x, 16, 1e-5)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), exact_rstd, rtol=1e-4, atol=0)


def test_other_layouts_and_dtypes_are_copied_for_the_kernel():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 40, 40, generator=gen)  # NCHW
    assert not x.is_contiguous(memory_format=torch.channels_last)
    one_channel = torch.randn(3, 1, 8, 8, generator=gen)  # NCHW and NHWC at once
    odd = torch.randn(2, 16, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last)[:, :, ::2]
    for tensor, groups in ((x, 8), (x.half(), 8), (x.double(), 8), (one_channel, 1), (odd, 4), (x[:, :, :1], 8)):
        mean, rstd = gn.group_norm_stats(tensor, groups, 1e-5)
        exact_mean, exact_rstd = exact_stats(tensor, groups, 1e-5)
        torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rstd.double(), exact_rstd, rtol=1e-5, atol=1e-6)


def kernel_layer(channels, groups, affine=True):
    gen = torch.Generator().manual_seed(channels)
    layer = torch.nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(channels, generator=gen))
            layer.bias.copy_(torch.randn(channels, generator=gen))
    assert gn.use_group_norm_kernel(layer) == 1 and isinstance(layer, gn.KernelGroupNorm)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_layer_uses_the_kernel_and_matches_group_norm(dtype, affine):
    layer = kernel_layer(32, 16, affine)
    layer.to(dtype)
    gen = torch.Generator().manual_seed(2)
    big, small = nhwc((2, 32, 40, 40), dtype, gen), nhwc((2, 32, 16, 16), dtype, gen)  # 1600 and 256 pixels
    compiled = torch.compile(lambda x: F.silu(layer(x)), dynamic=False, fullgraph=True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}
    for x, uses in ((big, True), (small, False)):
        expected = F.silu(F.group_norm(x.float(), 16, None if layer.weight is None else layer.weight.float(),
                                       None if layer.bias is None else layer.bias.float(), layer.eps))
        with torch.inference_mode():
            compiled(x)  # compiles (its tracing calls the op's fake too)
            with torch.profiler.profile() as prof:
                got = compiled(x)
        calls = {e.key: e.count for e in prof.key_averages()}
        assert calls.get("lcmserve::group_norm_stats", 0) == (1 if uses else 0), (x.shape, calls)
        torch.testing.assert_close(got.float(), expected, **tol)
        with torch.inference_mode(), torch.profiler.profile() as prof:  # eagerly the layer is torch's own
            eager = layer(x)
        assert "lcmserve::group_norm_stats" not in {e.key for e in prof.key_averages()}
        torch.testing.assert_close(eager, F.group_norm(x, 16, layer.weight, layer.bias, layer.eps))


def test_export_traces_torchs_group_norm():
    """torch.export (what the ONNX exporter runs) must not see our op: ONNX has GroupNormalization."""
    layer = kernel_layer(32, 16)
    x = nhwc((1, 32, 32, 32), torch.float32, torch.Generator().manual_seed(3))
    program = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("lcmserve" in t for t in targets) and any("group_norm" in t for t in targets), targets
