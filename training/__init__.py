"""Training of retouch's embedded ShapesWorld models (``src/retouch/models/embedded/``).

Not part of the installed package: the library is training-free and never imports this. Run it from the
repository root, ``python -m training STAGE ...`` (:mod:`training.cli`), with retouch installed (``make install``).
"""
