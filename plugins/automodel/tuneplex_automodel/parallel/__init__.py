"""The parallel layer: how one job's processes split the model, the data and the work.

- `dims`: the job's sizes and everything derived from them (no torch import);
- `mesh`: who this process is, the device mesh and the collectives the loop needs;
- `plans`: what is known per model family, as data (tensor-parallel plan, pipeline parts);
- `tp`, `fsdp`, `cp`, `ep`, `pp`: one applier each;
- `parallelize`: the order they are applied in, the loss function and gradient completion.
"""
