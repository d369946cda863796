"""PyTorch kernels (varlen attention dispatch, chunked cross-entropy); none are needed yet."""
