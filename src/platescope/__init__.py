"""platescope: bulk object detection over images and video, on Ray.

Heavy libraries (torch, transformers, ray) are imported where they are used, never here, so that
`import platescope` and `platescope --help` stay fast.
"""

__version__ = "0.1.0"
