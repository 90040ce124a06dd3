"""The engine: any chain of declared transforms as one in-place step of generated multi-tensor
kernels (:mod:`grokxform.engine.step`), planned from the primitives' declarations
(:mod:`grokxform.engine.plan`, :mod:`grokxform.engine.codegen`). Triton is imported only when a
step is built.
"""

from grokxform.engine.plan import Unsupported
from grokxform.engine.step import EngineStep, available, interpreting

__all__ = ["EngineStep", "Unsupported", "available", "interpreting"]
