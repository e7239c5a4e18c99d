import logging

__version__ = "0.1.0"

# A library logs through "llmirc.*" and leaves output to the application: nothing reaches stderr unless
# one configures it (`llmirc serve` does, at its --log-level).
logging.getLogger("llmirc").addHandler(logging.NullHandler())
