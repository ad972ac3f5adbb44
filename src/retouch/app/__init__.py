"""``retouch app``: an interactive web editor on the same engine as ``retouch edit``.

:mod:`retouch.app.service` holds everything that is not web: one shared model, form validation, the call to
:func:`retouch.editing.edit`, cancellation, upload limits and the files written to the app's working folder.
:mod:`retouch.app.ui` lays the page out with gradio (the optional ``app`` extra) and launches the server.
Importing this package loads no model and imports neither torch nor gradio.
"""

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a 20 MiB upload
DEFAULT_MAX_PIXELS = 4096 * 4096  # 16.8 Mpx: decoded as 8-bit RGB, 50 MB
