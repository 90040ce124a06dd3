"""The engine: any chain of declared transforms as one in-place step of generated multi-tensor
kernels (:mod:`grokxform.engine.step`), planned from the primitives' declarations
(:mod:`grokxform.engine.plan`) and written as Triton (:mod:`grokxform.engine.codegen`) or C
(:mod:`grokxform.engine.native`); the pure ``tx.update`` of a declared transform on the same
kernels, out of place (:mod:`grokxform.engine.functional`). Triton is imported only when a step of its kernels is built.
"""

from grokxform.engine import functional
from grokxform.engine.plan import Unsupported
from grokxform.engine.step import EngineStep, available, interpreting

__all__ = ["EngineStep", "Unsupported", "available", "functional", "interpreting"]
