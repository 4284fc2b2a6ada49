"""Training: staged knowledge distillation (`distill`), its losses, batches and resumable state.

losses    task loss (causal LM / classification / regression) and the KD term
batches   batch forms and batch sources
state     RNG states and the distill checkpoint
progress  the progress bar
distill   the staged-KD trainer (`moefx.distill`)
"""
