"""Peak GPU memory without a GPU: fake-CUDA tracing and the training estimate built on it.

Independent of the method: ``trace`` runs any function on fake CUDA tensors in a subprocess and
counts live bytes. Its parts: ``shim`` builds and loads a C++ shim (``fake_cuda_guard.cpp``) that
makes torch believe a device exists; ``child`` is the subprocess, which loads the shim before torch;
``session`` is what a traced function runs in; ``counters`` count the bytes; ``fake_cuda`` makes fake
CUDA behave like a GPU. ``estimate`` (``lowmcgm estimate``) uses it to trace the trainer's own setup
and steps (``training_trace``, with the benchmark's ``attention_layouts``); ``sampling`` and ``peers``
trace sampling and kohya's training step the same way.
Importing this package does not import torch: ``child`` must load the shim first in the subprocess.
"""
