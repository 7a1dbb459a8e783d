"""lessons_lib: the companion library of the Diffusion from Scratch course.

One module per idea, in lesson order (see DESIGN.md): ``device``, ``data``, ``schedules``,
``noising``, then ``viz`` and ``widgets`` on top.
"""

__version__ = "0.1.0"
