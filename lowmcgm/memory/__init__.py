"""Peak GPU memory without a GPU: fake-CUDA tracing and the training estimate built on it.

Independent of the method: ``trace`` runs any function on fake CUDA tensors in a subprocess (a C++
shim, ``fake_cuda_guard.cpp``, makes torch believe a device exists) and counts live bytes;
``estimate`` uses it to trace the trainer's own setup and steps (``lowmcgm estimate``).
Importing this package does not import torch: ``trace`` must load its shim first in the child.
"""
