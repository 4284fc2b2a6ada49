"""A model whose MoE is several times what one rank of a 4-rank job holds (the memory test).

NanoGPT, 4 blocks, d = 512 (FFN 512 -> 2048 -> 512: 2.1M parameters); with 64 experts in every
block the converted model has ~0.55B parameters (2.2 GB in fp32), of which EP = 4 gives each rank
a quarter of the experts and the small dense part."""
import torch

from moefx.models.nanogpt import NanoGPT, NanoGPTConfig


def build():
    model = NanoGPT(NanoGPTConfig(n_layer=4, n_head=8, n_embd=512, vocab_size=128, block_size=64)).eval()
    return model, (torch.randint(0, 128, (2, 8)),)
