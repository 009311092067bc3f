"""saekit: take features out of superposition with sparse autoencoders.

Sharkey, Braun & Millidge, "Taking features out of superposition with sparse
autoencoders" (interim report, 2022), built as a tool.
"""

__version__ = "0.1.0"
