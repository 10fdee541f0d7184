"""Triton kernels for the branches' own computations, used on CUDA where Triton is installed (it
comes with CUDA builds of torch). Each kernel has a torch equivalent that runs everywhere else;
the tests run both under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU and compare."""
