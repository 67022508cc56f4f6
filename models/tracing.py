"""Whether model code is running under a tracer: dynamo (``torch.compile``) or ``torch.export``."""

from __future__ import annotations

import torch


def tracing() -> bool:
    """True while dynamo or ``torch.export`` traces the calling code into a graph.

    Model code that takes another formulation in a traced graph (``models.addressing``'s memory
    products, ``models.encoders``' convolutions) asks this, not ``torch.compiler.is_compiling``:
    that one reads a flag of the whole process, so while one model thread compiles a graph,
    an eager call on another thread would take the graph's formulation too. Dynamo answers
    ``is_dynamo_compiling`` as True only in the code it traces. ``is_exporting`` is a flag of
    the whole process, but a server exports only in a child process (``models.aot.PackageBuild``).
    """
    return torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting()
