"""retouch: training-free, text-guided image editing with diffusion and rectified-flow models.

Importing this package loads no model and touches no device.
"""

__version__ = "0.1.0"
