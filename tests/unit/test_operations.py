"""The operations namespace: every network is built from the classes and functions it is handed, model files import
no kernel, and the accelerated set changes nothing a CPU computes."""
from __future__ import annotations

import ast
import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.operations import GroupNorm, Operations, torch_operations
from xportrait_core.model.temporal import MotionModule
from xportrait_core.model.xportrait import XPortrait

MODEL_DIR = Path(__file__).resolve().parents[2] / "xportrait_core" / "model"


def imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of the modules a source file imports (relative imports resolved against `package`)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from .. import fast` imports the submodule `fast` of the package.
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_the_import_scan_sees_relative_and_absolute_kernel_imports():
    package = "xportrait_core.model"
    assert "xportrait_core.fast.geglu" in imported_modules("from ..fast import geglu", package)
    assert "xportrait_core.fast.group_norm" in imported_modules("from ..fast.group_norm import X", package)
    assert "xportrait_core.fast" in imported_modules("import xportrait_core.fast", package)
    assert "xportrait_core.fast" in imported_modules("def f():\n    from .. import fast\n", package)
    assert not any(m.startswith("xportrait_core.fast")
                   for m in imported_modules("from .attention import attention", package))


def test_no_model_file_imports_anything_from_fast():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert len(files) > 10
    offenders = {path.name: [m for m in imported_modules(path.read_text(), "xportrait_core.model")
                             if m == "xportrait_core.fast" or m.startswith("xportrait_core.fast.")]
                 for path in files}
    assert {name: found for name, found in offenders.items() if found} == {}


# ---- every network is built from what it is handed ----------------------------------------------------------


def _counting_operations(counts: Counter, current: list[str]) -> Operations:
    """Plain operations whose classes and functions count their calls by the network that made them."""
    base = torch_operations()

    def counted_class(cls):
        class Counted(cls):
            def forward(self, *args, **kwargs):
                counts[(cls.__name__, current[-1])] += 1
                return super().forward(*args, **kwargs)

        return Counted

    def attention(q, k, v, *, causal=False):
        counts[("attention", current[-1])] += 1
        return base.attention(q, k, v, causal=causal)

    def gated_gelu(projection):
        counts[("gated_gelu", current[-1])] += 1
        return base.gated_gelu(projection)

    return Operations(Linear=counted_class(base.Linear), Conv2d=counted_class(base.Conv2d),
                      GroupNorm=counted_class(base.GroupNorm), LayerNorm=counted_class(base.LayerNorm),
                      attention=attention, gated_gelu=gated_gelu)


def _track(module: nn.Module, label: str, current: list[str]) -> None:
    module.register_forward_pre_hook(lambda *_: current.append(label))
    module.register_forward_hook(lambda *_: current.pop() and None)  # a hook returning a value would replace the output


def test_every_network_calls_the_classes_and_functions_it_was_handed():
    counts, current = Counter(), ["outside"]
    torch.manual_seed(0)
    model = XPortrait(XPortraitConfig.tiny(), with_text_encoder=True,
                      operations=_counting_operations(counts, current)).eval()
    for name in ("unet", "reference_net", "global_control", "local_control", "text_encoder"):
        _track(getattr(model, name), name, current)
    for part in (model.vae.encoder, model.vae.decoder, model.vae.quant_conv, model.vae.post_quant_conv):
        _track(part, "vae", current)
    for module in model.unet.modules():
        if isinstance(module, MotionModule):
            _track(module, "motion modules", current)
    with torch.no_grad():
        context = model.empty_prompt_context()
        images = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = model.encode_images(images[:1], sample=False)
        bank = model.reference_bank(latents, 500, context)
        eps = model.eps_cond(torch.randn(2, 4, 8, 8), 500, context, bank, images, images, num_frames=2)
        model.decode_latents(eps[:1])
    networks = ("unet", "reference_net", "global_control", "local_control", "motion modules")
    expected = {
        "Linear": networks + ("text_encoder",),
        "Conv2d": networks[:4] + ("vae",),
        "GroupNorm": networks + ("vae",),
        "LayerNorm": networks + ("text_encoder",),
        "attention": networks + ("vae", "text_encoder"),
        "gated_gelu": networks,
    }
    for kind, users in expected.items():
        for network in users:
            assert counts[(kind, network)] > 0, (kind, network)
    # Nothing ran outside a network, and no network used a layer of its own choosing: every Linear, Conv2d,
    # GroupNorm and LayerNorm of the model is one of the handed classes.
    assert not [key for key in counts if key[1] == "outside"]
    handed = model.operations
    for name, module in model.named_modules():
        for field, base in (("Linear", nn.Linear), ("Conv2d", nn.Conv2d), ("GroupNorm", nn.GroupNorm),
                            ("LayerNorm", nn.LayerNorm)):
            if isinstance(module, base):
                assert isinstance(module, getattr(handed, field)), (name, field)


def test_the_checkpoint_keys_do_not_depend_on_the_operations():
    def shapes(operations):
        with torch.device("meta"):
            model = XPortrait(XPortraitConfig.tiny(), with_text_encoder=True, operations=operations)
        return {k: v.shape for k, v in model.state_dict().items()}

    plain = shapes(None)
    assert shapes(fast_operations()) == plain
    assert shapes(_counting_operations(Counter(), ["x"])) == plain


# ---- the plain and the accelerated sets ---------------------------------------------------------------------


def test_no_operations_means_plain_pytorch():
    model = XPortrait(XPortraitConfig.tiny(), with_text_encoder=False)
    assert model.operations == torch_operations()
    assert type(model.unet.out[0]) is GroupNorm and type(model.unet.time_embed[0]) is nn.Linear


def test_fast_operations_keep_the_bases_layers_and_put_kernels_in_front_of_the_rest():
    class HostLinear(nn.Linear):
        pass

    class HostGroupNorm(nn.GroupNorm):
        pass

    def host_attention(q, k, v, *, causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    base = dataclasses.replace(torch_operations(), Linear=HostLinear, GroupNorm=HostGroupNorm,
                               attention=host_attention)
    fast = fast_operations(base)
    assert fast.Linear is HostLinear
    assert issubclass(fast.Conv2d, base.Conv2d) and fast.Conv2d is not base.Conv2d
    assert issubclass(fast.GroupNorm, HostGroupNorm) and fast.GroupNorm is not HostGroupNorm
    assert issubclass(fast.LayerNorm, base.LayerNorm) and fast.LayerNorm is not base.LayerNorm
    assert fast.attention is not host_attention and fast.gated_gelu is not base.gated_gelu
    assert fast_operations(base) == fast  # built once per base: models built twice get the same classes
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.Linear = nn.Linear  # type: ignore[misc]
    # Off CUDA every kernel hands the call to the base.
    q = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(fast.attention(q, q, q), host_attention(q, q, q))
    projection = torch.randn(4, 10)
    torch.testing.assert_close(fast.gated_gelu(projection), base.gated_gelu(projection))


def test_a_model_built_from_the_fast_operations_computes_what_the_plain_one_does_on_the_cpu(
        tiny_model, golden_state_dict_path, golden_cases):
    from xportrait_core.model.checkpoint import load_xportrait

    fast = load_xportrait(golden_state_dict_path, operations=fast_operations())
    c = golden_cases
    with torch.no_grad():
        results = []
        for model in (tiny_model, fast):
            bank = model.reference_bank(c["reference_latent"][:1], 500, c["context"])
            results.append(model.eps_cond(c["x_noisy"], c["timesteps"], c["context"], bank, c["global_hint"],
                                          c["local_hint"]))
    assert torch.equal(results[0], results[1])


def test_the_plain_group_norm_keeps_float32_statistics_for_half_input_on_the_cpu():
    norm = GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(2, 8, 3, 3) * 3 + 5).to(torch.bfloat16)
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, 1e-6).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    assert torch.equal(norm(x), expected)
    x32 = x.float()
    torch.testing.assert_close(norm(x32), F.group_norm(x32, 4, norm.weight, norm.bias, 1e-6))


def test_the_group_norm_kernel_stands_aside_for_a_layer_its_host_casts_or_patches(monkeypatch):
    from xportrait_core.fast import group_norm

    # Stand in for CUDA: the kernel "applies" to every input and marks its output.
    monkeypatch.setattr(group_norm, "supports", lambda x: True)
    monkeypatch.setattr(group_norm, "group_norm_channels_last", lambda x, *args: torch.full_like(x, 7.0))

    class HostGroupNorm(nn.GroupNorm):
        casts = False

    base = dataclasses.replace(torch_operations(), GroupNorm=HostGroupNorm)
    layer = fast_operations(base, defers=lambda module: module.casts).GroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(layer(x), torch.full_like(x, 7.0))
    layer.casts = True
    torch.testing.assert_close(layer(x), F.group_norm(x, 2, layer.weight, layer.bias, layer.eps))
    # Weights in another dtype than the input (a lower-precision storage cast as it runs) are the base's too.
    layer.casts = False
    with pytest.raises(RuntimeError):  # torch's own GroupNorm refuses mixed dtypes: the base ran, not the kernel
        layer(x.double())
