"""Distributed state below training, jobs and `moefx.distribute`: what a rank needs to take part in a job.

worker      process group set-up from torchrun's environment, heartbeats, one-line failure reports
mesh        the job's DeviceMesh and its named groups (`build_mesh`)
grads       gradient reduction and the global gradient norm, from placement records
checkpoint  sharded, reshardable, verified DCP checkpoints

This package imports nothing from `moefx.runtime`, `moefx.train` or `moefx.distribute` (the import
test checks it); they build on it. Import the submodules explicitly.
"""
