"""The local web page (``lowmcgm ui``): paint masks, train, draw poses and sample in a browser.

An optional extra (``pip install -e .[ui]`` adds gradio). The page is a thin layer: every check,
training step and image comes from the library's own functions, and errors are the same one-line
messages the CLI prints. Modules:

- ``editor``: the drawing canvases' values to and from mask arrays; masks shown over the photo.
- ``workspace``: run folders under the page's root (never another path typed into the page),
  the uploaded inputs written there, and the ``lowmcgm run`` command a training job runs.
- ``jobs``: one training job at a time, in a child process that the page starts, stops and reads.
- ``poses``: a pose library drawn from the toy world, for pose masks without painting.
- ``page_state``: what the page keeps between clicks, and the one-line messages every tab shows.
- ``subjects_tab``, ``train_tab``, ``sample_tab``: each tab's callbacks (widget values in, library
  calls, what the widgets show out).
- ``app``: the gradio page itself (its layout and wiring), and ``launch``.
"""

from __future__ import annotations

from lowmcgm.errors import UserError


def require_gradio():
    """Import gradio, or say how to install it (the core install does not include it)."""
    try:
        import gradio
    except ImportError as exc:
        raise UserError("The web page needs gradio, an optional extra: pip install -e '.[ui]' "
                        "(or pip install 'lowmcgm[ui]').") from exc
    return gradio
