"""Scaling tools: plan a cluster run, run a joint LLM x ViT x data sweep, fit the joint law.

    spec.py        ClusterSpec, WorkloadSpec (the plan's typed inputs)
    shapes.py      the planned model: a flavor, or an LLM size + the encoder from the law
    inventory.py   the parameters one GPU holds at a layout, by part (conversion registry)
    memory.py      bytes per GPU: parameters, gradients, optimizer shards, activations
    throughput.py  per-layer throughput table and collective times
    steptime.py    predicted step time, tokens/s, MFU of a layout
    layouts.py     candidate layouts and the project's rules that refuse them
    planner.py     `navil-scaling plan`: rank the layouts that fit
    report.py      text tables
    sweep_spec.py  the grid file; sweep.py runs it (local or a SLURM array)
    stats.py, fit.py, plots.py, law.py   `navil-scaling fit` and the fitted law
The console script is megatron_navil/cli/scaling.py (docs/scaling.md).
"""
