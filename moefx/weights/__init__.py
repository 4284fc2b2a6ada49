"""Where a rank's tensors come from: sources of dense or saved weights, and materialising a graph's
meta tensors from them (only the rank's own pieces are ever allocated).

sources      tensors by global name: a module, a safetensors folder (streamed), a seeded init, zeros
materialize  fill a (partitioned) meta graph from a source, slicing each tensor by its placement
"""
