"""compile_networks marks for compilation the modules that sampling and decoding actually call."""
from __future__ import annotations

from xportrait_core.fast.compilation import NETWORKS, compile_networks
from xportrait_core.model.blocks import ResBlock, SpatialTransformer
from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.xportrait import XPortrait
from xportrait_core.model.temporal import MotionModule
from xportrait_core.model.vae import ResnetBlock


def _compiled(module) -> bool:
    # nn.Module.compile() stores the compiled forward here; nothing is compiled until the first call.
    return getattr(module, "_compiled_call_impl", None) is not None


def test_whole_network_compile_covers_the_vae_halves_decode_and_encode_call():
    model = compile_networks(XPortrait(XPortraitConfig.tiny(), with_text_encoder=False), regional=False)
    assert all(_compiled(getattr(model, name)) for name in NETWORKS)
    # decode_chunked / encode_chunked never call AutoencoderKL.forward, so compiling it would leave them eager.
    assert _compiled(model.vae.decoder) and _compiled(model.vae.encoder)


def test_regional_compile_covers_every_repeated_block_and_no_whole_network():
    model = compile_networks(XPortrait(XPortraitConfig.tiny(), with_text_encoder=False), regional=True)
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, SpatialTransformer, MotionModule, ResnetBlock))]
    assert blocks and all(_compiled(m) for m in blocks)
    assert not any(_compiled(getattr(model, name)) for name in NETWORKS + ("vae",))


def test_compile_blocks_compiles_a_lone_vae_s_blocks_and_raises_the_recompile_limit():
    """A network compiled on its own (the benchmarks' compiled VAE arm: bench_comfy.py --ab vae_compiled)."""
    import torch._dynamo

    from xportrait_core.fast.compilation import RECOMPILE_LIMIT, compile_blocks
    from xportrait_core.model.vae import AttnBlock, AutoencoderKL

    # Dynamo's own patcher (monkeypatch's undo deletes the setting, which hides it from Dynamo afterwards).
    with torch._dynamo.config.patch(recompile_limit=8):
        vae = compile_blocks(AutoencoderKL(XPortraitConfig.tiny().vae))
        blocks = [m for m in vae.modules() if isinstance(m, (ResnetBlock, AttnBlock))]
        assert blocks and all(_compiled(m) for m in blocks) and not _compiled(vae)
        assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT

