"""Generation with converted models: KV-cache graphs, the decoding loop, saving and loading.

cache      decoder LMs with a static KV cache in module buffers (what the graphs capture)
generator  convert_generator -> Generator (prefill + decode graphs, one set of weights), generate()
sampling   greedy / temperature / top-k / top-p
"""
