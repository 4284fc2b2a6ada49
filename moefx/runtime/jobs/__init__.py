"""The jobs `moefx launch` runs besides forward passes (`moefx.runtime.run_model`): one module per job.

generate  --generate: distributed KV-cache generation
train     --train: distributed training of the converted model
distill   --distill: distributed staged knowledge distillation into a student
"""
