"""The ``codefend`` command line: the application layer above the kernel (``harness``) and the
built-in plugin packages, which it may import (the kernel never does)."""
