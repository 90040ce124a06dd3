"""Hand-written multi-tensor Triton kernels for the standard pipelines (the kernel path of
:class:`grokxform.fused.FusedStep`).

- :mod:`grokxform.kernels.spec`: what a pipeline records about itself so a kernel can run it;
- :mod:`grokxform.kernels.step`: the step (scalar prologue, clip pass, update kernel);
- :mod:`grokxform.kernels._triton`: the Triton kernels (Triton is imported only there).

Nothing here is imported at ``import grokxform`` time except :mod:`~grokxform.kernels.spec`.
"""
